"""Side-by-side comparison of several segmentation methods on the same cases (issue 6, item 2).

Every entry is evaluated with `nnxai.lesions.evaluation`; each metric gets a 95 % percentile bootstrap CI from
resampling cases with replacement. The same resampled case sets serve every entry (a paired bootstrap),
so CIs of differences against the baseline (the first entry) come from the same replicates. Per-case
differences are also tested with the Wilcoxon signed-rank test (p = 1 when all differences are zero).

An entry may be an nnU-Net model folder (it has `fold_*` folders): it is predicted first with nnU-Net's own
`nnUNetPredictor` on the given images, into a cache folder that is reused while model, images and settings
stay the same (the weights are loaded with nnxai's safe checkpoint loader, not nnU-Net's full unpickling).
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import wilcoxon

from nnxai.files import write_atomically
from nnxai.lesions.evaluation import (COUNT_COLUMNS, METRIC_COLUMNS, CasePairing, EvaluationInputError, InstanceOptions,
                                      evaluate_folders, metrics_from_counts)

COMPARED_METRICS = (*METRIC_COLUMNS, "lesion_tp", "lesion_fp", "lesion_fn")
AGGREGATES = ("mean_over_cases", "pooled")
FIGURE_METRICS = ("dice", "ndsc", "lesion_f1", "lesion_tpr", "lesion_ppv", "lesion_fdr")  # all in [0, 1]
CI_PERCENTILES = (2.5, 97.5)


@dataclass(frozen=True)
class Entry:
    """One compared method: a name and a folder of its predicted masks, or an nnU-Net model folder."""
    name: str
    path: Path


@dataclass(frozen=True)
class ModelPrediction:
    """How model-folder entries are predicted: input images, cache folder and nnU-Net's prediction settings."""
    images_dir: Path
    cache_dir: Path
    device: str = "cpu"
    step_size: float = 0.5
    use_mirroring: bool = True
    checkpoint_name: str = "checkpoint_final.pth"
    trust_checkpoint: bool = False


PREDICTION_RECORD = "nnxai_prediction.json"


def parse_entry(text: str) -> Entry:
    """`NAME=FOLDER` -> Entry."""
    name, separator, path = text.partition("=")
    if not separator or not name.strip() or not path:
        raise EvaluationInputError(f"{text!r}: expected NAME=PRED_DIR or NAME=MODEL_DIR")
    if not Path(path).is_dir():
        raise EvaluationInputError(f"{path}: not a folder (entry {name.strip()})")
    return Entry(name.strip(), Path(path))


def is_model_folder(path: Path) -> bool:
    """nnU-Net model folders hold `fold_*` folders; prediction folders do not."""
    return any(p.is_dir() for p in Path(path).glob("fold_*"))


def predictions_folder(entry: Entry, prediction: ModelPrediction | None = None, progress: bool = False) -> Path:
    """The folder of predicted masks an entry stands for; a model folder is predicted into the cache first."""
    if not is_model_folder(entry.path):
        return entry.path
    if prediction is None:
        raise EvaluationInputError(f"{entry.path}: an nnU-Net model folder (has fold_*); give the images to "
                                   f"predict (--images) or a folder of predictions (entry {entry.name})")
    return predict_model_folder(entry, prediction, progress)


def predict_model_folder(entry: Entry, prediction: ModelPrediction, progress: bool = False) -> Path:
    """Predict every case of `prediction.images_dir` with the entry's model into `cache_dir/<name>/`.

    The folder appears complete or not at all, and is reused while its record (model identity with
    checkpoint hashes, input files with sizes and times, settings) is unchanged.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnxai.explain.cases import CaseError, check_channels, find_cases
    from nnxai.nnunet.model import load_model

    model = load_model(entry.path, None, prediction.checkpoint_name, prediction.trust_checkpoint)
    images_dir = Path(prediction.images_dir)
    ending = model.dataset_json["file_ending"]
    try:
        cases = find_cases(images_dir, ending, len(model.channel_names))
        for files in cases.values():
            check_channels(files)
    except CaseError as error:
        raise EvaluationInputError(f"{error} (entry {entry.name})") from None
    if not cases:
        raise EvaluationInputError(f"{images_dir}: no input images CASE_0000{ending} (entry {entry.name})")
    record = {"model": model.describe(), "images": str(images_dir.resolve()),
              "inputs": {Path(f).name: [f.stat().st_size, f.stat().st_mtime_ns] for fs in cases.values() for f in fs},
              "settings": {"step_size": prediction.step_size, "use_mirroring": prediction.use_mirroring}}
    record = json.loads(json.dumps(record, default=str))
    target = Path(prediction.cache_dir) / entry.name
    if (target / PREDICTION_RECORD).is_file() and json.loads((target / PREDICTION_RECORD).read_text()) == record:
        return target
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's progress prints stay off the report
            predictor = nnUNetPredictor(tile_step_size=prediction.step_size, use_mirroring=prediction.use_mirroring,
                                        perform_everything_on_device=prediction.device == "cuda",
                                        device=torch.device(prediction.device), allow_tqdm=progress)
            # each fold gets its own copy of the weights: the predictor loads them in turn into one network
            predictor.manual_initialization(copy.deepcopy(model.networks[0]), model.plans_manager,
                                            model.configuration_manager,
                                            [copy.deepcopy(network.state_dict()) for network in model.networks],
                                            model.dataset_json, model.trainer_name, model.mirror_axes)
            predictor.predict_from_files_sequential([[str(f) for f in files] for files in cases.values()],
                                                    str(staging), save_probabilities=False, overwrite=True)
        (staging / PREDICTION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def bootstrap_indices(n_cases: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n_cases) case indices drawn with replacement, shared by all entries."""
    return np.random.default_rng(seed).integers(0, n_cases, size=(n_bootstrap, n_cases))


def statistic_replicates(per_case: pd.DataFrame, indices: np.ndarray,
                         lesion_f1: str = "counts") -> dict[tuple[str, str], tuple[float, np.ndarray]]:
    """(metric, aggregate) -> (value on all cases, bootstrap replicates) for every compared metric."""
    all_cases = np.arange(len(per_case))[None]
    summed = {c: per_case[c].to_numpy(dtype=float)[np.concatenate([all_cases, indices])].sum(axis=1)
              for c in COUNT_COLUMNS}
    pooled = {**summed, **metrics_from_counts(summed, lesion_f1)}
    result = {}
    for metric in COMPARED_METRICS:
        means = per_case[metric].to_numpy(dtype=float)[np.concatenate([all_cases, indices])].mean(axis=1)
        result[metric, "mean_over_cases"] = (float(means[0]), means[1:])
        result[metric, "pooled"] = (float(pooled[metric][0]), pooled[metric][1:])
    return result


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences; 1 when every difference is zero."""
    return float(wilcoxon(differences).pvalue) if np.any(differences != 0) else 1.0


@dataclass(frozen=True)
class Comparison:
    """Per-case values of all entries, the side-by-side metric table and the differences against the baseline."""
    entries: list[str]
    per_case: pd.DataFrame
    metrics: pd.DataFrame
    differences: pd.DataFrame
    pairings: dict[str, CasePairing]
    options: InstanceOptions
    n_bootstrap: int
    seed: int

    @property
    def baseline(self) -> str:
        return self.entries[0]

    @property
    def markdown(self) -> str:
        return comparison_markdown(self)


def summarize(per_case_by_entry: dict[str, pd.DataFrame], n_bootstrap: int, seed: int, lesion_f1: str = "counts"
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Side-by-side metric table with CIs, and per-case differences against the first entry.

    All per-case tables must list the same cases in the same order; pooled F1 is computed by `lesion_f1`.
    """
    names = list(per_case_by_entry)
    baseline = per_case_by_entry[names[0]]
    indices = bootstrap_indices(len(baseline), n_bootstrap, seed)
    replicates = {name: statistic_replicates(table, indices, lesion_f1) for name, table in per_case_by_entry.items()}
    rows = []
    for metric in COMPARED_METRICS:
        for aggregate in AGGREGATES:
            row = {"metric": metric, "aggregate": aggregate}
            for name in names:
                value, reps = replicates[name][metric, aggregate]
                low, high = np.percentile(reps, CI_PERCENTILES)
                row.update({name: value, f"{name}_ci_low": low, f"{name}_ci_high": high})
            rows.append(row)
    differences = []
    for name in names[1:]:
        for metric in COMPARED_METRICS:
            per_case_difference = (per_case_by_entry[name][metric].to_numpy(dtype=float)
                                   - baseline[metric].to_numpy(dtype=float))
            low, high = np.percentile(per_case_difference[indices].mean(axis=1), CI_PERCENTILES)
            differences.append({"metric": metric, "entry": name, "baseline": names[0],
                                "mean_difference": float(per_case_difference.mean()), "ci_low": low,
                                "ci_high": high, "wilcoxon_p": wilcoxon_p(per_case_difference),
                                "cases": len(per_case_difference)})
    return pd.DataFrame(rows), pd.DataFrame(differences)


def compare_tables(per_case_by_entry: dict[str, pd.DataFrame], pairings: dict[str, CasePairing],
                   options: InstanceOptions = InstanceOptions(), n_bootstrap: int = 2000, seed: int = 0
                   ) -> Comparison:
    """Compare entries from their per-case tables (counts and metrics, a `case` column), on their common cases."""
    names = list(per_case_by_entry)
    common = sorted(set.intersection(*(set(table["case"]) for table in per_case_by_entry.values())))
    if not common:
        raise EvaluationInputError(f"no case is evaluated for every entry ({', '.join(names)})")
    per_case_by_entry = {name: table.set_index("case").loc[common].reset_index()
                         for name, table in per_case_by_entry.items()}
    metrics, differences = summarize(per_case_by_entry, n_bootstrap, seed, options.lesion_f1)
    per_case = pd.concat([table.assign(entry=name) for name, table in per_case_by_entry.items()], ignore_index=True)
    per_case = per_case[["entry", *per_case.columns.drop("entry")]]
    return Comparison(names, per_case, metrics, differences, pairings, options, n_bootstrap, seed)


def compare_entries(gt_dir: Path, entries: Sequence[Entry], options: InstanceOptions = InstanceOptions(),
                    n_bootstrap: int = 2000, seed: int = 0, only_common: bool = False,
                    file_ending: str | None = None, progress: bool = False,
                    prediction: ModelPrediction | None = None) -> Comparison:
    """Evaluate every entry against `gt_dir` and compare them on the cases they all have.

    Model-folder entries are predicted first as `prediction` says (refused when it is None).
    """
    names = [entry.name for entry in entries]
    if len(entries) < 2:
        raise EvaluationInputError("compare needs at least two entries NAME=PRED_DIR (the first is the baseline)")
    if len(set(names)) != len(names):
        raise EvaluationInputError(f"entry names must be unique, got {', '.join(names)}")
    folders = {entry.name: predictions_folder(entry, prediction, progress) for entry in entries}
    evaluations = {name: evaluate_folders(gt_dir, folder, options, only_common, file_ending, progress)
                   for name, folder in folders.items()}
    return compare_tables({name: e.per_case for name, e in evaluations.items()},
                          {name: e.pairing for name, e in evaluations.items()}, options, n_bootstrap, seed)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def with_ci(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def comparison_markdown(comparison: Comparison) -> str:
    """The comparison as Markdown: metrics side by side, then differences against the baseline."""
    names = comparison.entries
    cases = comparison.per_case["case"].nunique()
    lines = [f"# Comparison against {comparison.baseline}", "",
             f"{cases} cases. Lesions: {comparison.options.describe()}. "
             f"Values with 95% percentile bootstrap CIs over cases ({comparison.n_bootstrap} replicates, "
             f"seed {comparison.seed}); mean_over_cases = mean of per-case values, pooled = from counts summed "
             "over cases (counts: totals).", ""]
    lines += _markdown_table(["metric", "aggregate", *names], [
        [row["metric"], row["aggregate"], *(with_ci(row[n], row[f"{n}_ci_low"], row[f"{n}_ci_high"]) for n in names)]
        for _, row in comparison.metrics.iterrows()])
    lines += ["", f"## Per-case differences against {comparison.baseline}", "",
              "Mean of per-case differences (entry - baseline) with 95% bootstrap CI; two-sided Wilcoxon "
              "signed-rank p.", ""]
    table = comparison.differences.set_index(["metric", "entry"])
    header = ["metric"] + [part for n in names[1:] for part in (f"{n} - {comparison.baseline}", f"p ({n})")]
    lines += _markdown_table(header, [
        [metric] + [part for n in names[1:] for part in (
            with_ci(*table.loc[(metric, n), ["mean_difference", "ci_low", "ci_high"]]),
            f"{table.loc[(metric, n), 'wilcoxon_p']:.3g}")]
        for metric in COMPARED_METRICS])
    return "\n".join(lines) + "\n"


def comparison_figure(comparison: Comparison) -> Figure:
    """Per-case values (grey lines join a case across entries) and mean over cases with its 95% CI."""
    names = comparison.entries
    figure = Figure(figsize=(4 * 3, 3.5 * 2), layout="constrained")
    metrics = comparison.metrics.set_index(["metric", "aggregate"])
    for axis, metric in zip(figure.subplots(2, 3).ravel(), FIGURE_METRICS):
        values = comparison.per_case.pivot(index="case", columns="entry", values=metric)[names]
        axis.plot(range(len(names)), values.to_numpy().T, color="0.7", linewidth=0.8, marker=".")
        row = metrics.loc[(metric, "mean_over_cases")]
        means = np.array([row[n] for n in names])
        errors = np.array([[m - row[f"{n}_ci_low"], row[f"{n}_ci_high"] - m] for n, m in zip(names, means)]).T
        axis.errorbar(range(len(names)), means, yerr=errors, color="black", fmt="o", capsize=4)
        axis.set_xticks(range(len(names)), names)
        axis.set_title(metric)
        axis.set_xlim(-0.5, len(names) - 0.5)
        axis.set_ylim(-0.05, 1.05)
    figure.suptitle(f"{len(values)} cases: per-case values and mean with 95% bootstrap CI")
    return figure


def write_comparison(comparison: Comparison, output_dir: Path) -> list[Path]:
    """Write metrics.csv, differences.csv, per_case.csv, comparison.md and comparison.png; each atomically.

    Everything is rendered before the first file is written.
    """
    output_dir = Path(output_dir)
    figure, markdown = comparison_figure(comparison), comparison.markdown
    writers = {
        "metrics.csv": lambda p: comparison.metrics.to_csv(p, index=False),
        "differences.csv": lambda p: comparison.differences.to_csv(p, index=False),
        "per_case.csv": lambda p: comparison.per_case.to_csv(p, index=False),
        "comparison.md": lambda p: p.write_text(markdown),
        "comparison.png": lambda p: figure.savefig(p, format="png", dpi=120),
    }
    for name, write in writers.items():
        write_atomically(output_dir / name, write)
    return [output_dir / name for name in writers]
