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

from dataset_conversion.nnunet_raw import write_splits
from dataset_conversion.phantom import make_phantom_cohort
from nnxai.analysis.comparison import Entry, compare_entries, write_comparison
from nnxai.analysis.fpfilter import FPFilter, apply_filter, train_filter_files
from nnxai.analysis.report import write_report
from nnxai.analysis.rings import ring_table, write_rings
from nnxai.analysis.statistics import group_statistics, write_statistics
from nnxai.errors import InputError
from nnxai.experiments.context import ContextDesign, context_experiment, summarize_context, write_summary
from nnxai.experiments.synthetic import SyntheticDesign, synthetic_experiment
from nnxai.explain.cohort import explain_cohort
from nnxai.explain.output import load_explain_output
from nnxai.explain.reopen import reopen_run
from nnxai.explain.settings import ComputeOptions, ExplainSettings
from nnxai.files import write_atomically
from nnxai.lesions.evaluation import evaluate_folders, write_evaluation
from nnxai.nnunet.environment import use_workspace
from nnxai.nnunet.model import load_model, model_folder
from nnxai.nnunet.plans import write_small_plans
from nnxai.sanity.common import InstanceSelection
from nnxai.sanity.faithfulness import deletion_sanity, summary_lines
from nnxai.sanity.randomization import randomization_sanity, verdict_lines

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
    # the study's post-processing (components of <= 5 voxels dropped) keeps a short-trained model's scattered
    # single-voxel false positives out of the explanations
    min_size: int = 6
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    synthetic: SyntheticDesign = SyntheticDesign(sizes_mm3=(30.0, 100.0, 300.0), flair_factors=(1.2, 1.5),
                                                 per_volume=3)
    synthetic_samples: int = 2
    context: ContextDesign = ContextDesign(min_voxels=None, max_voxels=None, min_mm3=80, max_mm3=300, max_mm=12,
                                           step_mm=4)
    context_bootstrap: int = 1000
    randomization: InstanceSelection = InstanceSelection(max_instances=1)
    randomized_layers: tuple[str, ...] = ()  # every block with weights
    deletion: InstanceSelection = InstanceSelection(max_instances=3)
    deletion_percents: tuple[float, ...] = (0, 10, 20, 30, 40, 50)

    @classmethod
    def fast(cls) -> "DemoSettings":
        # a barely trained model can put ~0.54 everywhere: 232 small FP components once took 1262 s to explain;
        # components of 50 voxels (400 mm^3) and more bound that, and nnU-Net's prediction stays unfiltered
        return cls(cases=5, epochs=4, iterations=50, samples=2, explain_cases=1, min_size=50,
                   synthetic=SyntheticDesign(sizes_mm3=(100.0,), flair_factors=(1.5,)), synthetic_samples=1,
                   context=ContextDesign(groups=("TP", "FN"), min_voxels=None, max_voxels=None, min_mm3=60,
                                         max_mm3=600, max_mm=8, step_mm=4),  # a fast model may find no TP
                   context_bootstrap=100,
                   randomized_layers=("decoder.seg_layers", "encoder.stages"),
                   deletion=InstanceSelection(max_instances=1), deletion_percents=(0, 25, 50))


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
        return [("phantom cohort", self.make_cohort), ("plan and preprocess", self.plan),
                ("train", self.train), ("predict", self.predict), ("evaluate", self.evaluate),
                ("train baseline", self.train_baseline), ("compare with baseline", self.compare),
                ("explain", self.explain), ("rings", self.rings), ("synthetic lesions", self.synthetic),
                ("perilesional context", self.context), ("statistics", self.statistics),
                ("sanity: randomization", self.randomization), ("sanity: deletion", self.deletion),
                ("false-positive filter", self.fpfilter), ("report", self.report)]

    def run(self) -> None:
        """Every stage not finished earlier, then the summary (also in OUT/demo_summary.txt)."""
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
        make_phantom_cohort(self.folders["nnUNet_raw"], self.settings.cases, self.settings.seed,
                            self.settings.spacing, DATASET_ID, DATASET_NAME, progress=True)

    def plan(self) -> None:
        self.nnunet("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "1",
                    "--verify_dataset_integrity")
        write_small_plans(DATASET_ID, PLANS, self.settings.patch_size, self.settings.features)
        self.write_split()

    def write_split(self) -> None:
        """Fold 0 validates on every fifth training case (at least one), whatever the cohort size."""
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
        evaluation = evaluate_folders(self.dataset / "labelsTs", self.predictions / TRAINER)
        write_evaluation(evaluation, self.out / "evaluation.csv")
        click.echo(evaluation.overall.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    def train_baseline(self) -> None:
        """nnU-Net's default loss on the same short schedule, the baseline of the comparison."""
        self.train(BASELINE_TRAINER)
        self.predict(BASELINE_TRAINER)

    def compare(self) -> None:
        comparison = compare_entries(self.dataset / "labelsTs",
                                     [Entry("nnUNetTrainer", self.predictions / BASELINE_TRAINER),
                                      Entry("WML", self.predictions / TRAINER)], n_bootstrap=1000, progress=True)
        write_comparison(comparison, self.out / "comparison")
        click.echo(comparison.markdown)

    def rings(self) -> None:
        output = load_explain_output(self.explained)
        click.echo(f"Wrote {write_rings(output, ring_table(output, progress=True))}")

    def synthetic(self) -> None:
        run = reopen_run(self.explained, samples=self.settings.synthetic_samples)
        table, _ = synthetic_experiment(run, self.settings.synthetic, device=self.settings.device)
        click.echo(f"synthetic: {len(table)} lesion(s), {int(table['detected'].astype(bool).sum())} detected")

    def context(self) -> None:
        table, _ = context_experiment(reopen_run(self.explained), self.settings.context, self.settings.device)
        summary = summarize_context(table, bootstrap=self.settings.context_bootstrap)
        click.echo(f"context: {summary['n_lesions']} lesion(s), required context {summary['required_context_mm']} mm; "
                   f"summary {write_summary(self.explained, summary)}")

    def statistics(self) -> None:
        output = load_explain_output(self.explained)
        click.echo(f"Wrote {write_statistics(output, group_statistics(output))}")

    def randomization(self) -> None:
        verdicts, _ = randomization_sanity(reopen_run(self.explained, samples=1), self.settings.randomization,
                                           self.settings.randomized_layers, independent=False,
                                           device=self.settings.device, progress=True)
        click.echo("\n".join(verdict_lines(verdicts)))

    def deletion(self) -> None:
        groups, _ = deletion_sanity(reopen_run(self.explained), self.settings.deletion, self.settings.deletion_percents,
                                    seeds=1, device=self.settings.device, progress=True)
        click.echo("\n".join(summary_lines(groups)))

    def fpfilter(self) -> None:
        """Train the saliency-based FP filter (grouped CV) and apply it to the explained cases."""
        self.fpfilter_model.parent.mkdir(exist_ok=True)
        try:
            training, _ = train_filter_files([self.explained], self.fpfilter_model, n_folds=2, progress=True)
        except InputError as error:  # e.g. a small cohort with only TP or only FP lesions
            raise StageSkipped(f"the filter was not trained: {error}") from None
        click.echo(f"FP filter: pooled out-of-fold AUC {training.model.cross_validation['pooled_auc']:.3f}")
        # the demo filters the cases it trained on: cross-fitting keeps that before/after out of sample
        apply_filter(training.model, self.explained, self.out / "fpfilter" / "filtered", overwrite=True,
                     progress=True, cross_fitted=True)

    def report(self) -> None:
        """The report of the explained cases, with the FP filter's AUC with and without uncertainty when the filter
        stage trained one."""
        fp_filter = FPFilter.load(self.fpfilter_model) if self.fpfilter_model.is_file() else None
        click.echo(f"Wrote {write_report(load_explain_output(self.explained), fp_filter=fp_filter)}")

    def explain(self) -> None:
        model = load_model(model_folder(str(DATASET_ID), CONFIGURATION, TRAINER, PLANS), [FOLD])
        cases = self.explain_images()
        settings = ExplainSettings(methods=("smoothgrad", "gradcampp"), samples=self.settings.samples,
                                   use_mirroring=False, min_size=self.settings.min_size)
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
