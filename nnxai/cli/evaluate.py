"""`nnxai evaluate` and `nnxai compare`: lesion-wise metrics of prediction folders against ground truth."""
from __future__ import annotations

from pathlib import Path

import click

from nnxai.cli.options import device_option, instance_options, option_group, trust_model_option
from nnxai.lesions.evaluation import CONVENTIONS, CasePairing, convention_options, evaluate_folders, write_evaluation

existing_folder = click.Path(exists=True, file_okay=False, path_type=Path)


evaluation_options = option_group(  # instance and matching options of `evaluate` and `compare`
    click.option("--convention", type=click.Choice(list(CONVENTIONS)), default="study", show_default=True,
                 help="Lesion matching and F1 as a benchmark publishes them: the study's (18-connectivity, any "
                      "overlap), Shifts (6, IoU >= 0.25), WMH 2017 (26, any overlap, GT label 2 ignored, "
                      "harmonic F1) or MSSEG-2016 (6, lesions > 3 mm^3, its detection rule, harmonic F1)."),
    instance_options(unset="the convention's"),
    click.option("--file-ending", default=None,
                 help="File ending of the masks [default: from dataset.json, else .nii.gz]."),
    click.option("--only-common", is_flag=True,
                 help="Evaluate the cases present in all folders; report (not fail on) the others."),
)




def report_pairing(pairing: CasePairing, label: str) -> None:
    """Tell the user which cases --only-common left out."""
    if pairing.mismatch_message():
        click.echo(f"Warning: {label}: not evaluated: {pairing.mismatch_message()}", err=True)


@click.command("evaluate")
@click.argument("gt_dir", type=existing_folder)
@click.argument("pred_dir", type=existing_folder)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Per-case CSV; the overall table goes to <name>_overall.csv beside it.")
@evaluation_options
def evaluate(gt_dir: Path, pred_dir: Path, output: Path | None, convention: str, connectivity: int | None,
             min_size: int | None, rule: str | None, iou_threshold: float | None, file_ending: str | None,
             only_common: bool) -> None:
    """Voxel Dice, nDSC and lesion-wise TP/FP/FN, TPR, FDR, FNR, PPV, F1 of PRED_DIR against GT_DIR.

    Overall values are given both as the mean over cases and pooled (from counts summed over cases).
    """
    options = convention_options(convention, connectivity, min_size, rule,
                                 iou_threshold)
    evaluation = evaluate_folders(gt_dir, pred_dir, options, only_common, file_ending, progress=True)
    report_pairing(evaluation.pairing, str(pred_dir))
    click.echo(f"{len(evaluation.per_case)} cases; lesions: {options.describe()}")
    click.echo(evaluation.overall.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if output:
        summary_path = write_evaluation(evaluation, output)
        click.echo(f"Wrote {output} and {summary_path}")


@click.command("compare")
@click.option("--gt", "gt_dir", type=existing_folder, required=True, help="Folder of ground-truth masks.")
@click.argument("entries", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder for metrics.csv, differences.csv, per_case.csv, comparison.md and .png.")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap replicates (cases resampled with replacement) for the 95% CIs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--images", "images_dir", type=existing_folder,
              help="nnU-Net input folder (CASE_0000.nii.gz, ...) to predict model-folder entries on.")
@device_option
@click.option("--disable-tta", is_flag=True, help="Predict model folders without mirroring (faster).")
@click.option("-step_size", "--step-size", "step_size", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              show_default=True, help="Sliding-window step for model folders, as a fraction of the patch size.")
@click.option("-chk", "--checkpoint", "checkpoint", default="checkpoint_final.pth", show_default=True,
              help="Checkpoint file name in the model folders' fold_* folders.")
@trust_model_option
@evaluation_options
def compare(gt_dir: Path, entries: tuple[str, ...], output: Path, n_bootstrap: int, seed: int,
            images_dir: Path | None, device: str, disable_tta: bool, step_size: float, checkpoint: str,
            trust_checkpoint: bool, convention: str, connectivity: int | None, min_size: int | None,
            rule: str | None, iou_threshold: float | None, file_ending: str | None, only_common: bool) -> None:
    """Compare entries NAME=PRED_DIR or NAME=MODEL_DIR against GT; the first entry is the baseline.

    A model folder (nnU-Net results folder with fold_*) is first predicted with nnU-Net on --images into
    OUTPUT/predictions/NAME (reused on later runs while model, images and settings are unchanged).
    Writes each metric with its 95% bootstrap CI side by side, and per-case differences against the
    baseline with their CI and Wilcoxon signed-rank p.
    """
    from nnxai.analysis.comparison import (ModelPrediction, compare_entries,  # scipy + matplotlib: load on use
                                           parse_entry, write_comparison)

    prediction = None
    if images_dir is not None:
        prediction = ModelPrediction(images_dir, output / "predictions", device, step_size, not disable_tta,
                                     checkpoint, trust_checkpoint)
    options = convention_options(convention, connectivity, min_size, rule,
                                 iou_threshold)
    parsed = [parse_entry(text) for text in entries]
    comparison = compare_entries(gt_dir, parsed, options, n_bootstrap, seed, only_common, file_ending,
                                 progress=True, prediction=prediction)
    for name, pairing in comparison.pairings.items():
        report_pairing(pairing, name)
    written = write_comparison(comparison, output)
    click.echo(comparison.markdown)
    click.echo("Wrote " + ", ".join(str(p) for p in written))
