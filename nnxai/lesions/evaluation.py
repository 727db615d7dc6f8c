"""Voxel- and lesion-wise evaluation of binary lesion segmentations against ground truth (SPEC section 6).

Per case we count voxels and lesions (see `COUNT_COLUMNS`); every metric is a function of these counts
(`metrics_from_counts`), so the same code gives per-case values and values pooled over cases (counts
summed over all cases first), and bootstrap replicates of both.

Metrics and their value when a denominator is empty (no silent NaN):

- ``dice`` = 2|P∩G| / (|P| + |G|); 1 when prediction and GT are both empty, 0 when only one is.
- ``ndsc`` = 2TP / (2TP + k·FP + FN) with k = (1 - r)|G| / (r (N - |G|)), r = 0.001 (normalized Dice,
  Shifts). Shifts conventions: 1 when both are empty; with empty GT k = 1, so any predicted voxel gives 0.
- ``lesion_tpr`` = detected GT lesions / GT lesions; ``lesion_fnr`` = 1 - TPR = missed GT lesions / GT
  lesions. With no GT lesion nothing can be missed: TPR = 1, FNR = 0.
- ``lesion_ppv`` = TP predicted lesions / predicted lesions; ``lesion_fdr`` = 1 - PPV. With no predicted
  lesion nothing was falsely detected: PPV = 1, FDR = 0.
- ``lesion_f1`` = TP / (TP + (FP + FN) / 2) with TP counted on predicted lesions (as Shifts does); 1 when
  there is no lesion in either mask (as Shifts). Conventions whose benchmark defines F1 as the harmonic mean
  of lesion PPV and TPR (WMH 2017, MSSEG) get 2 PPV TPR / (PPV + TPR), 0 when both are 0.

A predicted lesion touching two GT lesions is one TP (``lesion_tp``) while both GT lesions are detected
(``lesion_tp_gt``); that is why TP is counted on both sides and F1 need not equal the harmonic mean of
PPV and TPR. These conventions make per-case means optimistic on lesion-free cases; the pooled values
(counts summed over cases) are not affected by them unless the whole cohort is lesion-free.

How lesions are formed and matched follows a named convention (`CONVENTIONS`, `--convention`):

- ``study`` (default): 18-connectivity, any overlap, predicted components below ``--min-size`` dropped
  (the study: 6, i.e. components of <= 5 voxels; 1 unless asked).
- ``shifts`` (Shifts 2.0, ``mswml/metrics.py``): 6-connectivity (``scipy.ndimage.label``), a predicted lesion
  is TP when its best IoU with a GT lesion is >= 0.25, a GT lesion FN when its best IoU stays below.
- ``wmh2017`` (the WMH challenge's ``evaluation.py``): 26-connectivity, any overlap, GT label 2 (other
  pathology) removed from both masks; lesion recall = ``lesion_tpr``, F1 the harmonic mean.
- ``msseg`` (MSSEG-2016, animaSegPerfAnalyzer): 6-connectivity, lesions of <= 3 mm^3 not counted on either
  side, the MSSEG detection rule (`nnxai.lesions.instances`), F1 the harmonic mean.

Where a benchmark's own code gives NaN or 0 on an empty denominator, the values above are kept.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from nnxai.errors import InputError
from nnxai.files import write_atomically
from nnxai.lesions.instances import MSSEG_RULE, label_components, match_components

NDSC_REFERENCE_RATE = 0.001
DEFAULT_FILE_ENDING = ".nii.gz"
GEOMETRY_TOLERANCE = 1e-4
COUNT_COLUMNS = ("voxels", "gt_voxels", "pred_voxels", "overlap_voxels",
                 "gt_lesions", "pred_lesions", "lesion_tp", "lesion_tp_gt", "lesion_fp", "lesion_fn")
METRIC_COLUMNS = ("dice", "ndsc", "lesion_tpr", "lesion_fnr", "lesion_ppv", "lesion_fdr", "lesion_f1")
LESION_F1_RULES = ("counts", "harmonic")  # TP / (TP + (FP + FN) / 2), or 2 PPV TPR / (PPV + TPR)


class EvaluationInputError(InputError, ValueError):
    """Bad evaluation input; `problems` holds one line per bad file or case, each naming it."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class InstanceOptions:
    """How lesion instances are formed, matched and scored (see `nnxai.lesions.instances` and the module docstring).

    `min_size` post-processes the prediction (its voxels are gone for every metric); `min_lesion_mm3` only
    keeps smaller lesions of both masks out of the lesion counts; voxels of GT label `ignore_label` are
    removed from both masks.
    """
    connectivity: int = 18
    min_size: int = 1
    rule: str = "any"
    iou_threshold: float = 0.25
    convention: str = "study"
    lesion_f1: str = "counts"
    ignore_label: int | None = None
    min_lesion_mm3: float = 0.0

    def smallest_lesion_voxels(self, voxel_volume_mm3: float) -> int:
        """Fewest voxels a lesion needs to be counted: more than `min_lesion_mm3` (animaSegPerfAnalyzer's count)."""
        return int(np.floor(self.min_lesion_mm3 / voxel_volume_mm3)) + 1 if self.min_lesion_mm3 > 0 else 1

    def describe(self) -> str:
        """One line for reports: every choice that changes the numbers."""
        rule = {"any": "any overlap", "iou": f"IoU >= {self.iou_threshold}", MSSEG_RULE: "MSSEG detection"}[self.rule]
        parts = [f"convention {self.convention}", f"connectivity {self.connectivity}", f"min size {self.min_size}",
                 f"rule {rule}", "lesion F1 " + ("TP / (TP + (FP + FN) / 2)" if self.lesion_f1 == "counts"
                                                 else "2 PPV TPR / (PPV + TPR)")]
        if self.ignore_label is not None:
            parts.append(f"GT label {self.ignore_label} ignored")
        if self.min_lesion_mm3 > 0:
            parts.append(f"lesions of <= {self.min_lesion_mm3:g} mm^3 not counted")
        return ", ".join(parts)


CONVENTIONS = {
    "study": InstanceOptions(),
    "shifts": InstanceOptions(connectivity=6, rule="iou", iou_threshold=0.25, convention="shifts"),
    "wmh2017": InstanceOptions(connectivity=26, rule="any", convention="wmh2017", lesion_f1="harmonic",
                               ignore_label=2),
    "msseg": InstanceOptions(connectivity=6, rule=MSSEG_RULE, convention="msseg", lesion_f1="harmonic",
                             min_lesion_mm3=3.0),
}


def convention_options(convention: str = "study", connectivity: int | None = None, min_size: int | None = None,
                       rule: str | None = None, iou_threshold: float | None = None) -> InstanceOptions:
    """A named convention's options; the study's may be changed, a benchmark's matching may not.

    `min_size` (post-processing of the prediction) may be given with every convention.
    """
    if convention not in CONVENTIONS:
        raise EvaluationInputError(f"unknown convention {convention!r} (one of {', '.join(CONVENTIONS)})")
    preset = CONVENTIONS[convention]
    matching = {name: value for name, value in
                (("connectivity", connectivity), ("rule", rule), ("iou_threshold", iou_threshold)) if value is not None}
    if matching and convention != "study":
        name = next(iter(matching))
        raise EvaluationInputError(f"--{name.replace('_', '-')}: the {convention} convention fixes it "
                                   f"({getattr(preset, name)}); use --convention study to choose it")
    return replace(preset, **matching, **({} if min_size is None else {"min_size": min_size}))


def _ratio(numerator, denominator, empty_value: float) -> np.ndarray:
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    out = np.full(np.broadcast(numerator, denominator).shape, empty_value, dtype=float)
    return np.divide(numerator, denominator, out=out, where=denominator > 0)


def metrics_from_counts(counts: Mapping[str, np.ndarray | float], lesion_f1: str = "counts") -> dict[str, np.ndarray]:
    """All metrics (`METRIC_COLUMNS`) from counts, element-wise, F1 by `lesion_f1` (`LESION_F1_RULES`); empty
    cases as in the module docstring."""
    if lesion_f1 not in LESION_F1_RULES:
        raise ValueError(f"lesion_f1 must be one of {LESION_F1_RULES}, got {lesion_f1!r}")
    voxels, gt, pred, overlap = (np.asarray(counts[c], dtype=float)
                                 for c in ("voxels", "gt_voxels", "pred_voxels", "overlap_voxels"))
    false_positive_voxels, false_negative_voxels = pred - overlap, gt - overlap
    k = np.where(gt > 0, _ratio((1 - NDSC_REFERENCE_RATE) * gt, NDSC_REFERENCE_RATE * (voxels - gt), 0.0), 1.0)
    both_empty = (gt + pred) == 0
    ndsc = np.where(both_empty, 1.0, _ratio(2 * overlap, 2 * overlap + k * false_positive_voxels
                                            + false_negative_voxels, 0.0))
    tp, tp_gt, fp, fn = (np.asarray(counts[c], dtype=float)
                         for c in ("lesion_tp", "lesion_tp_gt", "lesion_fp", "lesion_fn"))
    gt_lesions, pred_lesions = tp_gt + fn, tp + fp
    tpr, ppv = _ratio(tp_gt, gt_lesions, 1.0), _ratio(tp, pred_lesions, 1.0)
    return {
        "dice": _ratio(2 * overlap, gt + pred, 1.0),
        "ndsc": ndsc,
        "lesion_tpr": tpr,
        "lesion_fnr": _ratio(fn, gt_lesions, 0.0),
        "lesion_ppv": ppv,
        "lesion_fdr": _ratio(fp, pred_lesions, 0.0),
        "lesion_f1": (_ratio(tp, tp + (fp + fn) / 2, 1.0) if lesion_f1 == "counts"
                      else _ratio(2 * ppv * tpr, ppv + tpr, 0.0)),
    }


def case_counts(pred: np.ndarray, gt: np.ndarray, options: InstanceOptions = InstanceOptions(),
                voxel_volume_mm3: float = 1.0, ignored: np.ndarray | None = None) -> dict[str, int]:
    """Voxel and lesion counts of one case.

    Voxels of `ignored` (the GT's `ignore_label`) leave both masks, then predicted components below
    `min_size` are dropped; lesions of at most `min_lesion_mm3` are left out of the lesion counts only.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if ignored is not None:
        pred, gt = pred & ~ignored, gt & ~ignored
    if options.min_size > 1:
        pred = label_components(pred, options.connectivity, options.min_size) > 0
    smallest = options.smallest_lesion_voxels(voxel_volume_mm3)
    pred_labels = label_components(pred, options.connectivity, smallest)
    gt_labels = label_components(gt, options.connectivity, smallest)
    matching = match_components(pred_labels, gt_labels, options.rule, options.iou_threshold)
    return {
        "voxels": int(gt.size),
        "gt_voxels": int(gt.sum()),
        "pred_voxels": int(pred.sum()),
        "overlap_voxels": int((pred & gt).sum()),
        "gt_lesions": len(matching.tp_gt) + len(matching.fn_gt),
        "pred_lesions": len(matching.tp_pred) + len(matching.fp_pred),
        "lesion_tp": len(matching.tp_pred),
        "lesion_tp_gt": len(matching.tp_gt),
        "lesion_fp": len(matching.fp_pred),
        "lesion_fn": len(matching.fn_gt),
    }


def with_metrics(counts: pd.DataFrame, lesion_f1: str = "counts") -> pd.DataFrame:
    """`counts` (one row per case) with the metric columns appended."""
    metrics = metrics_from_counts({c: counts[c].to_numpy() for c in COUNT_COLUMNS}, lesion_f1)
    return counts.assign(**metrics)


def overall_table(per_case: pd.DataFrame, lesion_f1: str = "counts") -> pd.DataFrame:
    """One row per count and metric: its mean over cases, and its value pooled over cases.

    Pooled means computed from the counts summed over all cases (for a count: the total).
    """
    totals = per_case[list(COUNT_COLUMNS)].sum()
    pooled = {**totals.to_dict(), **{m: float(v) for m, v in metrics_from_counts(totals, lesion_f1).items()}}
    names = [*COUNT_COLUMNS, *METRIC_COLUMNS]
    return pd.DataFrame({"metric": names,
                         "mean_over_cases": [float(per_case[n].mean()) for n in names],
                         "pooled": [float(pooled[n]) for n in names]})


def file_ending_for(*folders: Path) -> str:
    """The `file_ending` of the first dataset.json in `folders`, else nnU-Net's default ".nii.gz"."""
    for folder in folders:
        dataset_json = Path(folder) / "dataset.json"
        if dataset_json.is_file():
            try:
                return json.loads(dataset_json.read_text())["file_ending"]
            except (ValueError, KeyError, TypeError) as error:
                raise EvaluationInputError(f"{dataset_json}: cannot read 'file_ending' ({error!r})") from error
    return DEFAULT_FILE_ENDING


def list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    """Case id -> file for the files in `folder` ending with `file_ending` (hidden files ignored)."""
    folder = Path(folder)
    if not file_ending:
        raise EvaluationInputError("the file ending must not be empty (e.g. '.nii.gz')")
    if not folder.is_dir():
        raise EvaluationInputError(f"{folder}: not a folder")
    return {p.name[:-len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(file_ending) and not p.name.startswith(".")}


@dataclass(frozen=True)
class CasePairing:
    """Cases evaluated, and cases found in only one of the two folders (reported, never silently dropped)."""
    cases: list[str]
    only_in_ground_truth: list[str]
    only_in_predictions: list[str]

    def mismatch_message(self) -> str:
        parts = [f"{len(names)} case(s) only in {where}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
                 for where, names in (("ground truth", self.only_in_ground_truth),
                                      ("predictions", self.only_in_predictions)) if names]
        return "; ".join(parts)


def pair_cases(gt_cases: Mapping[str, Path], pred_cases: Mapping[str, Path], gt_dir: Path, pred_dir: Path,
               only_common: bool = False) -> CasePairing:
    """Match case ids of two folders; differing lists are an error unless `only_common` is set."""
    pairing = CasePairing(sorted(set(gt_cases) & set(pred_cases)), sorted(set(gt_cases) - set(pred_cases)),
                          sorted(set(pred_cases) - set(gt_cases)))
    if not gt_cases:
        raise EvaluationInputError(f"{gt_dir}: no ground-truth files found")
    if not pairing.cases:
        raise EvaluationInputError(f"{pred_dir}: no prediction matches a ground-truth case in {gt_dir}")
    if pairing.mismatch_message() and not only_common:
        raise EvaluationInputError(f"{pred_dir} vs {gt_dir}: {pairing.mismatch_message()} "
                                   f"(use --only-common to evaluate the {len(pairing.cases)} common cases)")
    return pairing


def read_labels(path: Path, allowed: tuple[int, ...] = (0, 1)) -> tuple[np.ndarray, sitk.Image]:
    """A label image as a 3D array (2D images get a leading axis) whose values must be in `allowed`, and the
    image for geometry checks."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise EvaluationInputError(f"{path}: cannot read image ({reason})") from error
    array = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1 or array.ndim not in (2, 3):
        raise EvaluationInputError(f"{path}: expected a single-channel 2D or 3D mask, got array shape {array.shape}")
    valid = np.isin(array, allowed)
    if not valid.all():
        values = ", ".join(str(v) for v in np.unique(array[~valid])[:5])
        names = f"{', '.join(map(str, allowed[:-1]))} and {allowed[-1]}"
        kind = "binary mask" if len(allowed) == 2 else "label mask"
        raise EvaluationInputError(f"{path}: not a {kind} (values other than {names}: {values})")
    labels = np.asarray(array, dtype=np.uint8)
    return (labels[None] if labels.ndim == 2 else labels), image


def read_mask(path: Path) -> tuple[np.ndarray, sitk.Image]:
    """A binary mask as a 3D bool array (2D images get a leading axis) and its image for geometry checks."""
    labels, image = read_labels(path)
    return labels == 1, image


def check_same_geometry(pred_path: Path, pred_image: sitk.Image, gt_path: Path, gt_image: sitk.Image) -> None:
    """Raise unless prediction and GT share size, spacing, origin and direction."""
    for name, getter in (("size", sitk.Image.GetSize), ("spacing", sitk.Image.GetSpacing),
                         ("origin", sitk.Image.GetOrigin), ("direction", sitk.Image.GetDirection)):
        pred_value, gt_value = getter(pred_image), getter(gt_image)
        if len(pred_value) != len(gt_value) or not np.allclose(pred_value, gt_value, rtol=0,
                                                               atol=GEOMETRY_TOLERANCE):
            raise EvaluationInputError(f"{pred_path}: {name} {tuple(round(v, 6) for v in pred_value)} differs "
                                       f"from ground truth {gt_path} ({tuple(round(v, 6) for v in gt_value)})")


def evaluate_case(gt_path: Path, pred_path: Path, options: InstanceOptions = InstanceOptions()) -> dict[str, int]:
    """Counts of one case read from disk, after checking both files (the GT may hold `options.ignore_label`)."""
    ignore = () if options.ignore_label is None else (options.ignore_label,)
    gt_labels, gt_image = read_labels(gt_path, (0, 1, *ignore))
    pred, pred_image = read_mask(pred_path)
    check_same_geometry(pred_path, pred_image, gt_path, gt_image)
    return case_counts(pred, gt_labels == 1, options, float(np.prod(gt_image.GetSpacing())),
                       np.isin(gt_labels, ignore) if ignore else None)


@dataclass(frozen=True)
class Evaluation:
    """Per-case counts and metrics (one row per case), the overall table, and how the cases were paired."""
    per_case: pd.DataFrame
    overall: pd.DataFrame
    pairing: CasePairing
    options: InstanceOptions


def evaluate_folders(gt_dir: Path, pred_dir: Path, options: InstanceOptions = InstanceOptions(),
                     only_common: bool = False, file_ending: str | None = None,
                     progress: bool = False) -> Evaluation:
    """Evaluate every case of an nnU-Net prediction folder against a folder of ground-truth masks.

    The file ending comes from `file_ending`, else from dataset.json in the prediction folder, the GT folder
    or its parent (nnU-Net's labelsTr layout), else ".nii.gz". All cases are checked; if any is bad, one
    `EvaluationInputError` lists every bad case.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    ending = file_ending or file_ending_for(pred_dir, gt_dir, gt_dir.parent)
    gt_files, pred_files = list_cases(gt_dir, ending), list_cases(pred_dir, ending)
    pairing = pair_cases(gt_files, pred_files, gt_dir, pred_dir, only_common)
    rows, problems = [], []
    for case in tqdm(pairing.cases, desc=f"evaluate {pred_dir.name}", disable=not progress, unit="case"):
        try:
            rows.append({"case": case, **evaluate_case(gt_files[case], pred_files[case], options)})
        except EvaluationInputError as error:
            problems += error.problems
    if problems:
        raise EvaluationInputError(problems)
    per_case = with_metrics(pd.DataFrame(rows, columns=["case", *COUNT_COLUMNS]), options.lesion_f1)
    return Evaluation(per_case, overall_table(per_case, options.lesion_f1), pairing, options)


def overall_path(per_case_path: Path) -> Path:
    """Where `write_evaluation` puts the overall table next to the per-case table."""
    per_case_path = Path(per_case_path)
    return per_case_path.with_name(f"{per_case_path.name.removesuffix('.csv')}_overall.csv")


def write_evaluation(evaluation: Evaluation, per_case_path: Path) -> Path:
    """Write the per-case table to `per_case_path` and the overall table beside it; returns the latter."""
    summary_path = overall_path(per_case_path)
    write_atomically(per_case_path, lambda p: evaluation.per_case.to_csv(p, index=False))
    write_atomically(summary_path, lambda p: evaluation.overall.to_csv(p, index=False))
    return summary_path
