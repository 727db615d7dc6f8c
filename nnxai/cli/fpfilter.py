"""`nnxai fpfilter train|apply`: flag false-positive lesions from their saliency features."""
from __future__ import annotations

from pathlib import Path

import click

existing_folder = click.Path(exists=True, file_okay=False, path_type=Path)
REPORTED_METRICS = ("lesion_f1", "lesion_ppv", "lesion_tpr")


@click.group("fpfilter")
def fpfilter() -> None:
    """Flag false-positive lesions from their saliency maps: train a classifier, apply it."""


@fpfilter.command("train")
@click.argument("out_dirs", nargs=-1, required=True, type=existing_folder)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Model file (.joblib); <name>_features.csv and <name>_cv.csv go beside it.")
@click.option("--patients", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with columns case, patient: cross-validation keeps each patient's cases together "
                   "[default: every case is its own patient].")
@click.option("--classifier", type=click.Choice(["logistic", "forest"]), default="logistic", show_default=True,
              help="L1 logistic regression (the follow-up study) or a random forest; both after standardizing.")
@click.option("-C", "C", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Inverse L1 regularization strength of the logistic regression.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Cross-validation folds (at most the number of patients).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="P(FP) above which `apply` removes an instance (stored in the model).")
@click.option("--shell-mm", type=click.IntRange(min=1), default=2, show_default=True,
              help="Width of the shell around each instance whose saliency statistics are features.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fold assignment and classifier.")
def train(out_dirs: tuple[Path, ...], output: Path, patients: Path | None, classifier: str, C: float, folds: int,
          threshold: float, shell_mm: int, seed: int) -> None:
    """Train on the TP and FP instances of explain output folders OUT... (explained with --gt)."""
    from nnxai.analysis.fpfilter import train_filter_files

    training, paths = train_filter_files(list(out_dirs), output, patients, classifier, C, folds, seed, threshold,
                                         shell_mm, progress=True)
    summary = training.model.cross_validation
    fold_auc = ", ".join("n/a" if a is None else f"{a:.3f}" for a in summary["fold_auc"])
    click.echo(f"{summary['tp']} TP and {summary['fp']} FP instances from "
               f"{training.instances['patient'].nunique()} patients, {len(training.model.feature_columns)} features")
    click.echo(f"{summary['folds']}-fold patient-grouped CV: pooled out-of-fold AUC {summary['pooled_auc']:.3f}; "
               f"per fold {fold_auc}")
    if "pooled_auc_without_uncertainty" in summary:
        click.echo(f"the same CV without the uncertainty features: pooled AUC "
                   f"{summary['pooled_auc_without_uncertainty']:.3f}")
    click.echo(f"out of fold at threshold {threshold}: would remove {summary['fp_removed']} of {summary['fp']} FP "
               f"and {summary['tp_removed']} of {summary['tp']} TP instances")
    coefficients = training.model.coefficients()
    if not coefficients.empty:
        click.echo(f"{len(coefficients)} non-zero coefficients (standardized features), largest first:")
        click.echo(coefficients.head(10).to_string(float_format=lambda v: f"{v:+.3f}"))
    click.echo(f"Wrote {', '.join(str(p) for p in paths)}")


@fpfilter.command("apply")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=existing_folder)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the filtered masks (<case>.nii.gz), instances.csv, removed.csv and evaluation/.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Remove instances with P(FP) above this [default: the model's].")
@click.option("--gt", "gt_dir", type=existing_folder,
              help="Ground-truth masks for before/after metrics [default: the explain run's, if it still exists].")
@click.option("--only-common", is_flag=True, help="Evaluate only the cases that have ground truth.")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap replicates (cases resampled) for the 95% CIs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--cross-fitted", is_flag=True,
              help="Score the cases the filter was trained on with the cross-validation model that did not see "
                   "their patient (out-of-sample before/after on the training cases); other cases as usual.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def apply(model_path: Path, out_dir: Path, output: Path, threshold: float | None, gt_dir: Path | None,
          only_common: bool, n_bootstrap: int, seed: int, cross_fitted: bool, overwrite: bool) -> None:
    """Remove the instances MODEL flags as false positives from the predictions of explain folder OUT_DIR.

    The model file is unpickled: use only model files from a source you trust.
    """
    from nnxai.analysis.comparison import with_ci
    from nnxai.analysis.fpfilter import FPFilter, apply_filter

    model = FPFilter.load(model_path)
    result = apply_filter(model, out_dir, output, threshold, gt_dir, only_common, n_bootstrap, seed, overwrite,
                          progress=True, cross_fitted=cross_fitted)
    used = model.threshold if threshold is None else threshold
    click.echo(f"removed {len(result.removed)} of {len(result.scores)} instances (P(FP) > {used}); "
               f"filtered masks and tables in {result.output}")
    if cross_fitted:
        held_out = int((result.scores["scored_by_fold"] > 0).sum())
        click.echo(f"cross-fitted: {held_out} instance(s) scored by the fold model that did not see their patient, "
                   f"{len(result.scores) - held_out} by the final model")
    if result.without_ground_truth:
        click.echo(f"Warning: {len(result.without_ground_truth)} case(s) without ground truth not evaluated: "
                   f"{', '.join(result.without_ground_truth[:10])}", err=True)
    if result.comparison is None:
        click.echo("no ground truth (--gt): before/after metrics not computed")
        return
    metrics = result.comparison.metrics.set_index(["metric", "aggregate"])
    differences = result.comparison.differences.set_index("metric")
    click.echo(f"\n{result.comparison.per_case['case'].nunique()} cases, 95% bootstrap CIs; difference = mean "
               "per-case after - before, Wilcoxon p")
    for metric in REPORTED_METRICS:
        for aggregate in ("pooled", "mean_over_cases"):
            before, after = (with_ci(*metrics.loc[(metric, aggregate), [name, f"{name}_ci_low", f"{name}_ci_high"]])
                             for name in ("before", "after"))
            click.echo(f"{metric:<11} {aggregate:<16} before {before}  after {after}")
        difference = differences.loc[metric]
        change = with_ci(*difference[["mean_difference", "ci_low", "ci_high"]])
        click.echo(f"{metric:<11} {'difference':<16} {change}  p {difference['wilcoxon_p']:.3g}")
    click.echo(f"All metrics: {result.output / 'evaluation' / 'comparison.md'}")
