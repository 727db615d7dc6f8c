"""`nnxai demo`: the whole study on built-in phantom data, stage by stage, resumable.

phantom cohort -> nnU-Net planning and preprocessing -> small CPU plans -> short training with the
study's trainer -> nnUNetv2_predict and lesion-wise evaluation -> explanations of every test lesion.
Each finished stage leaves a marker, so a re-run continues after the last finished stage. A stage that
refuses this cohort (the FP filter needs both TP and FP lesions) is skipped with its reason; the summary at
the end (`OUT/demo_summary.txt`) lists every stage as done or skipped, with the reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from nnxai.nnunet.environment import use_workspace

DATASET_ID = 901
DATASET_NAME = "MSPhantom"
PLANS = "nnxaiCPUPlans"
TRAINER = "nnUNetTrainerWMLShort"
BASELINE_TRAINER = "nnUNetTrainerShort"
CONFIGURATION = "3d_fullres"
FOLD = "0"
SUMMARY_FILE = "demo_summary.txt"
SKIPPED = "skipped: "


class StageSkipped(Exception):
    """A stage that cannot run on this cohort; the message is the reason the summary gives."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; `fast()` is the variant the end-to-end test runs."""

    cases: int = 12
    seed: int = 0
    spacing: float = 2.0
    patch_size: tuple[int, int, int] = (32, 32, 32)
    features: tuple[int, ...] = (8, 16, 32, 64)
    epochs: int = 16
    iterations: int = 40
    samples: int = 2  # the study's 50 on CPU would take hours; explain's time grows with samples x instances
    explain_cases: int = 2
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    synthetic: tuple[str, ...] = ("--sizes", "30,100,300", "--flair-factors", "1.2,1.5", "--samples", "2",
                                  "--per-volume", "3")
    context: tuple[str, ...] = ("--min-mm3", "80", "--max-mm3", "300", "--max-mm", "12", "--step-mm", "4",
                                "--groups", "TP")
    randomization: tuple[str, ...] = ("--max-instances", "1", "--no-independent", "--samples", "1")
    deletion: tuple[str, ...] = ("--max-instances", "3", "--k", "0:50:10", "--seeds", "1")

    @classmethod
    def fast(cls) -> "DemoSettings":
        return cls(cases=5, epochs=2, iterations=10, samples=2, explain_cases=1,
                   synthetic=("--sizes", "100", "--flair-factors", "1.5", "--samples", "1"),
                   context=("--min-mm3", "60", "--max-mm3", "600", "--max-mm", "8", "--step-mm", "4",
                            "--groups", "TP,FN", "--bootstrap", "100"),  # a fast model may find no TP
                   randomization=("--max-instances", "1", "--no-independent", "--samples", "1",
                                  "--layers", "decoder.seg_layers", "--layers", "encoder.stages"),
                   deletion=("--max-instances", "1", "--k", "0:50:25", "--seeds", "1"))


class Demo:
    """The demo's folders and stages under one output folder."""

    def __init__(self, out: Path, settings: DemoSettings):
        self.out = out.resolve()
        self.settings = settings
        self.folders = use_workspace(self.out)
        self.dataset = self.folders["nnUNet_raw"] / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
        self.predictions = self.out / "predictions"
        self.explained = self.out / "explain"
        self.fpfilter_model = self.out / "fpfilter" / "filter.joblib"
        self.markers = self.out / ".stages"

    @property
    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        out = str(self.explained)
        return [("phantom cohort", self.make_cohort), ("plan and preprocess", self.plan),
                ("train", self.train), ("predict", self.predict), ("evaluate", self.evaluate),
                ("train baseline", self.train_baseline), ("compare with baseline", self.compare),
                ("explain", self.explain),
                ("rings", self.command("experiment", "rings", out)),
                ("synthetic lesions", self.command("experiment", "synthetic", out, *self.settings.synthetic)),
                ("perilesional context", self.command("experiment", "context", out, *self.settings.context)),
                ("statistics", self.command("stats", out)),
                ("sanity: randomization", self.command("sanity", "randomize", out, *self.settings.randomization)),
                ("sanity: deletion", self.command("sanity", "deletion", out, *self.settings.deletion)),
                ("false-positive filter", self.fpfilter),
                ("report", self.report)]

    @staticmethod
    def command(*args: str) -> Callable[[], None]:
        """A stage that runs an nnxai command exactly as a user would type it."""
        def run() -> None:
            from nnxai.cli import main

            click.echo(f"$ nnxai {' '.join(args)}")
            main(list(args), standalone_mode=False)
        return run

    def run(self) -> None:
        """Every stage not finished earlier, then the summary (also in OUT/demo_summary.txt)."""
        from nnxai.files import write_atomically

        self.markers.mkdir(parents=True, exist_ok=True)
        start = time.time()
        outcomes = []
        for number, (name, stage) in enumerate(self.stages, start=1):
            marker = self.markers / name.replace(" ", "_")
            header = f"[{number}/{len(self.stages)}] {name}"
            if marker.exists():
                click.echo(f"{header}: done earlier, skipped")
            else:
                click.echo(f"{header} ...")
                stage_start = time.time()
                try:
                    stage()
                    marker.write_text("done")
                except StageSkipped as reason:
                    marker.write_text(f"{SKIPPED}{reason}")
                click.echo(f"{header}: {marker.read_text()} ({time.time() - stage_start:.0f} s, "
                           f"total {time.time() - start:.0f} s)")
            outcomes.append(f"{name}: {marker.read_text() or 'done'}")
        write_atomically(self.out / SUMMARY_FILE, "\n".join(outcomes) + "\n")
        click.echo("Summary:\n  " + "\n  ".join(outcomes))

    @staticmethod
    def nnunet(program: str, *args: str, **environment: str) -> None:
        """Run one of nnU-Net's own commands from this environment, its output shown as it comes."""
        executable = Path(sys.executable).with_name(program)
        # two worker processes at most: nnU-Net otherwise starts one per core and more for augmentation
        env = {"nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2", **os.environ, "nnUNet_compile": "false",
               **environment}
        completed = subprocess.run([str(executable), *args], env=env)
        if completed.returncode != 0:
            raise click.ClickException(f"{program} failed with exit code {completed.returncode}")

    def make_cohort(self) -> None:
        from dataset_conversion.phantom import make_phantom_cohort

        make_phantom_cohort(self.folders["nnUNet_raw"], self.settings.cases, self.settings.seed,
                            self.settings.spacing, DATASET_ID, DATASET_NAME, progress=True)

    def plan(self) -> None:
        from nnxai.nnunet.plans import write_small_plans

        self.nnunet("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "1",
                    "--verify_dataset_integrity")
        write_small_plans(DATASET_ID, PLANS, self.settings.patch_size, self.settings.features)
        self.write_split()

    def write_split(self) -> None:
        """Fold 0 validates on every fifth training case (at least one), whatever the cohort size."""
        from dataset_conversion.nnunet_raw import write_splits

        cases = sorted(p.name.removesuffix(".nii.gz") for p in (self.dataset / "labelsTr").glob("*.nii.gz"))
        validation = cases[::5]
        write_splits(self.dataset.name, [{"train": [c for c in cases if c not in validation], "val": validation}])

    def train(self, trainer: str = TRAINER) -> None:
        self.nnunet("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, FOLD, "-tr", trainer, "-p", PLANS,
                    "-device", self.settings.device, NNXAI_EPOCHS=str(self.settings.epochs),
                    NNXAI_ITERATIONS=str(self.settings.iterations))

    def predict(self, trainer: str = TRAINER) -> None:
        """nnU-Net's own prediction of the test cases (no mirroring, like the demo's explanations)."""
        self.nnunet("nnUNetv2_predict", "-i", str(self.dataset / "imagesTs"), "-o", str(self.predictions / trainer),
                    "-d", str(DATASET_ID), "-c", CONFIGURATION, "-tr", trainer, "-p", PLANS, "-f", FOLD,
                    "-device", self.settings.device, "-npp", "1", "-nps", "1", "--disable_tta")

    def evaluate(self) -> None:
        from nnxai.lesions.evaluation import evaluate_folders, write_evaluation

        evaluation = evaluate_folders(self.dataset / "labelsTs", self.predictions / TRAINER)
        write_evaluation(evaluation, self.out / "evaluation.csv")
        click.echo(evaluation.overall.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    def train_baseline(self) -> None:
        """nnU-Net's default loss on the same short schedule, the baseline of the comparison."""
        self.train(BASELINE_TRAINER)
        self.predict(BASELINE_TRAINER)

    def compare(self) -> None:
        self.command("compare", "--gt", str(self.dataset / "labelsTs"), "-o", str(self.out / "comparison"),
                     f"nnUNetTrainer={self.predictions / BASELINE_TRAINER}", f"WML={self.predictions / TRAINER}",
                     "--bootstrap", "1000")()
        click.echo((self.out / "comparison" / "comparison.md").read_text())

    def fpfilter(self) -> None:
        """Train the saliency-based FP filter (grouped CV) and apply it to the explained cases."""
        model_file = self.fpfilter_model
        model_file.parent.mkdir(exist_ok=True)
        try:
            self.command("fpfilter", "train", str(self.explained), "-o", str(model_file), "--folds", "2")()
        except click.ClickException as error:  # e.g. a small cohort with only TP or only FP lesions
            raise StageSkipped(f"the filter was not trained: {error.format_message()}") from None
        # the demo filters the cases it trained on: cross-fitting keeps that before/after out of sample
        self.command("fpfilter", "apply", str(model_file), str(self.explained), "-o",
                     str(self.out / "fpfilter" / "filtered"), "--cross-fitted", "--overwrite")()

    def report(self) -> None:
        """The report of the explained cases, with the FP filter's AUC with and without uncertainty when the filter
        stage trained one."""
        trained = ("--fpfilter", str(self.fpfilter_model)) if self.fpfilter_model.is_file() else ()
        self.command("report", str(self.explained), *trained)()

    def explain(self) -> None:
        from nnxai.explain.cohort import explain_cohort
        from nnxai.explain.settings import ComputeOptions, ExplainSettings
        from nnxai.nnunet.model import load_model, model_folder

        model = load_model(model_folder(str(DATASET_ID), CONFIGURATION, TRAINER, PLANS), [FOLD])
        cases = self.explain_images()
        # the study's post-processing (components of <= 5 voxels dropped) keeps a short-trained model's
        # scattered single-voxel false positives out of the explanations
        settings = ExplainSettings(methods=("smoothgrad", "gradcampp"), samples=self.settings.samples,
                                   use_mirroring=False, min_size=6)
        # a phantom case's maps fit in memory together, so each sample's tiles are forwarded once for all
        # instances instead of once per group of --max-maps (one case, one sample: 45.7 s instead of 51.9 s)
        result = explain_cohort(model, cases, self.explained, settings, self.dataset / "labelsTs",
                                device=self.settings.device, compute=ComputeOptions(max_maps=None))
        if result.failed:
            raise click.ClickException(f"explain failed for {', '.join(result.failed)}")

    def explain_images(self) -> Path:
        """The test cases to explain: the first `explain_cases` of imagesTs, linked into one folder."""
        folder = self.out / "explain_inputs"
        folder.mkdir(exist_ok=True)
        cases = sorted({p.name[:-12] for p in (self.dataset / "imagesTs").glob("*_0000.nii.gz")})
        for case in cases[: self.settings.explain_cases]:
            for source in (self.dataset / "imagesTs").glob(f"{case}_*.nii.gz"):
                link = folder / source.name
                if not link.exists():
                    link.symlink_to(source)
        return folder
