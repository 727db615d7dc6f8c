"""`nnxai experiment ...`: experiments on an `nnxai explain` output folder.

Each subcommand takes the explain output folder OUT: the model, the input images, the ground truth and the
prediction settings come from OUT/run.json (so the experiment predicts what the explained model predicts);
options override them. Results go to OUT/experiments/. Subcommands are imported on first use; add one with a
line in EXPERIMENTS.
"""
from __future__ import annotations

from pathlib import Path

import click

from nnxai.cli import LazyGroup
from nnxai.cli.options import device_option, instance_options, option_group, trust_model_option
from nnxai.experiments.common import experiment_folder
from nnxai.explain.reopen import ReopenedRun, reopen_run
from nnxai.explain.resumable import CohortResult
from nnxai.lesions.instances import GROUPS, UNKNOWN_GROUP

EXPERIMENTS = {
    "synthetic": "nnxai.cli.experiment:synthetic",
    "context": "nnxai.cli.experiment:context",
    "rings": "nnxai.cli.analysis:rings",
}

out_argument = click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))


@click.group("experiment", cls=LazyGroup, lazy_commands=EXPERIMENTS,
             context_settings={"help_option_names": ["-h", "--help"]})
def experiment() -> None:
    """Experiments on an nnxai explain output folder OUT (results in OUT/experiments/)."""


def number_list(kind: type):
    """A click callback parsing "10,30,100" into a tuple of `kind`."""
    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            return tuple(kind(item) for item in value.split(",") if item.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected comma-separated numbers") from None
    return parse


run_options = option_group(  # where model and data come from, and prediction overrides
    click.option("-m", "--model", "model_dir", type=click.Path(path_type=Path),
                 help="Model folder [default: from run.json]."),
    click.option("-i", "--images", "images", type=click.Path(path_type=Path),
                 help="Input images folder (nnU-Net format) [default: from run.json]."),
    click.option("--gt", "gt_dir", type=click.Path(path_type=Path),
                 help="Ground-truth labels folder [default: from run.json]."),
    click.option("-f", "folds", multiple=True, help="Folds [default: from run.json]."),
    click.option("-chk", "checkpoint", help="Checkpoint file name [default: from run.json]."),
    trust_model_option,
    device_option,
    click.option("--disable-tta", "--disable_tta", "disable_tta", is_flag=True,
                 help="No mirroring test-time augmentation [default: as run.json]."),
    click.option("--threshold", type=click.FloatRange(0, 1),
                 help="Lesion probability threshold [default: run.json]."),
    instance_options(unset="run.json"),
    click.option("--cases", callback=lambda ctx, param, value: value.split(",") if value else None,
                 help="Only these cases (comma-separated) [default: all cases of the images folder]."),
    click.option("--overwrite", is_flag=True, help="Start again (default: skip finished cases, so runs resume)."),
)


def _samples(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    if not value.isdigit():
        raise click.BadParameter(f"{value!r}: a number of samples (0: no saliency) or auto")
    return int(value)


def open_run(out: Path, model_dir, images, gt_dir, folds, checkpoint, trust_checkpoint, disable_tta,
             **setting_overrides) -> ReopenedRun:
    """Reopen OUT with the command line's overrides of run.json."""
    return reopen_run(out, images, gt_dir, model_dir, folds, checkpoint, trust_checkpoint,
                      use_mirroring=False if disable_tta else None, **setting_overrides)


def finish(name: str, out: Path, outcome: CohortResult, what: str) -> None:
    """Say what was done and where the table is; exit 1 when a case failed (the others are kept)."""
    click.echo(f"{name}: {what}; {len(outcome.done)} case(s) done, {len(outcome.skipped)} finished earlier, "
               f"{len(outcome.failed)} failed; table {experiment_folder(out, name)}.csv")
    if outcome.failed:
        raise SystemExit(1)


@experiment.command("synthetic")
@out_argument
@run_options
@click.option("--sizes", callback=number_list(float), default="10,30,100,300,1000", show_default=True,
              help="Lesion volumes (mm^3).")
@click.option("--flair-factors", callback=number_list(float), default="1.1,1.2,1.323,1.5", show_default=True,
              help="Mean FLAIR intensity factors inside the lesion (recipe: 1.323).")
@click.option("--t1-factors", callback=number_list(float), default="0.791", show_default=True,
              help="Mean T1/MPRAGE intensity factors (recipe: 0.791).")
@click.option("--flair-sd", type=click.FloatRange(min=0), default=0.068, show_default=True,
              help="Voxelwise sd of the FLAIR factor field.")
@click.option("--t1-sd", type=click.FloatRange(min=0), default=0.139, show_default=True,
              help="Voxelwise sd of the T1 factor field.")
@click.option("--per-case", type=click.IntRange(min=1), default=1, show_default=True,
              help="Lesions of each size x contrast combination per case.")
@click.option("--per-volume", type=click.IntRange(min=1), default=1, show_default=True,
              help="Lesions inserted together in one synthetic volume (1: each lesion predicted on its own).")
@click.option("--min-distance-mm", type=click.FloatRange(min=0), default=40.0, show_default=True,
              help="Distance between the centres of lesions sharing a volume.")
@click.option("--clearance-mm", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Distance kept from existing (ground-truth or predicted) lesions.")
@click.option("--margin-mm", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Depth of a lesion centre inside normal-appearing white matter.")
@click.option("--seed", type=int, default=0, show_default=True, help="Placement and contrast seed.")
@click.option("--wm-mask", "wm_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of white-matter masks (CASE.nii.gz, non-zero = WM) [default: T1 intensity classes].")
@click.option("--save-volumes", is_flag=True,
              help="Also write each synthetic volume to OUT/experiments/synthetic_volumes/.")
@click.option("--samples", callback=lambda ctx, param, value: _samples(value),
              help="SmoothGrad samples: a number, auto, or 0 for no saliency maps [default: run.json].")
def synthetic(out, sizes, flair_factors, t1_factors, flair_sd, t1_sd, per_case, per_volume, min_distance_mm,
              clearance_mm, margin_mm, seed, wm_dir, save_volumes, samples, **run) -> None:
    """Insert synthetic lesions into normal-appearing white matter; record detection, probability and saliency."""
    from nnxai.experiments.synthetic import SyntheticDesign, synthetic_experiment

    design = SyntheticDesign(sizes, flair_factors, t1_factors, flair_sd, t1_sd, per_case, per_volume,
                             min_distance_mm, clearance_mm, margin_mm, seed)
    device, overwrite, cases = run.pop("device"), run.pop("overwrite"), run.pop("cases")
    table, outcome = synthetic_experiment(open_run(out, samples=samples, **run), design, wm_dir, save_volumes, device,
                                          overwrite, cases=cases)
    detected = int(table["detected"].astype(bool).sum()) if len(table) else 0
    finish("synthetic", out, outcome, f"{len(table)} lesion(s), {detected} detected")


@experiment.command("context")
@out_argument
@run_options
@click.option("--groups", default="TP", show_default=True,
              callback=lambda ctx, param, value: tuple(g.strip() for g in value.split(",") if g.strip()),
              help=f"Lesion groups to study ({', '.join((*GROUPS, UNKNOWN_GROUP))}).")
@click.option("--min-voxels", type=click.IntRange(min=1),
              help="Smallest lesion (voxels) [default: 91 unless a mm^3 bound is given].")
@click.option("--max-voxels", type=click.IntRange(min=1),
              help="Largest lesion (voxels) [default: 119 unless a mm^3 bound is given].")
@click.option("--min-mm3", type=click.FloatRange(min=0), help="Smallest lesion volume (mm^3).")
@click.option("--max-mm3", type=click.FloatRange(min=0), help="Largest lesion volume (mm^3).")
@click.option("--max-mm", type=click.FloatRange(min=0), default=34.0, show_default=True, help="Largest context k (mm).")
@click.option("--step-mm", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Step between context radii (mm).")
@click.option("--plateau-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Required context: detection stays >= this fraction of its rate at --max-mm.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples of lesions for the interval (0: none).")
@click.option("--confidence", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.95,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
def context(out, groups, min_voxels, max_voxels, min_mm3, max_mm3, max_mm, step_mm, plateau_fraction, bootstrap,
            confidence, seed, **run) -> None:
    """Keep the image only within k mm of each lesion, predict, and estimate the context the model needs."""
    from nnxai.experiments.context import ContextDesign, context_experiment, summarize_context, write_summary

    if min_mm3 is None and max_mm3 is None:  # the study's TP lesions of 91-119 voxels
        min_voxels = 91 if min_voxels is None else min_voxels
        max_voxels = 119 if max_voxels is None else max_voxels
    design = ContextDesign(groups, min_voxels, max_voxels, min_mm3, max_mm3, max_mm, step_mm)
    device, overwrite, cases = run.pop("device"), run.pop("overwrite"), run.pop("cases")
    table, outcome = context_experiment(open_run(out, **run), design, device, overwrite, cases=cases)
    summary = summarize_context(table, plateau_fraction, bootstrap, confidence, seed)
    path = write_summary(out, summary)
    if summary["required_context_mm"] is None:
        result = f"{summary['n_lesions']} lesion(s); required context undefined ({summary['note']})"
    else:
        interval = "" if summary["ci_low"] is None else \
            f" ({100 * confidence:g}% CI {summary['ci_low']:g} - {summary['ci_high']:g} mm)"
        result = f"{summary['n_lesions']} lesion(s); required context {summary['required_context_mm']:g} mm{interval}"
    result += f"; summary {path}"
    finish("context", out, outcome, result)
