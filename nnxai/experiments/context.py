"""Perilesional context (SPEC section 5.3): how much tissue around a lesion the model needs to segment it.

For each selected lesion (default: TP lesions of 91-119 voxels, as in the study) and each k = 0, step, ...,
max_mm, the network input (after nnU-Net's normalization) is kept only within k mm of the lesion and set to 0,
the normalized background, elsewhere; the masked input is predicted and the lesion's mean probability and
detection are recorded. k = 0 keeps the lesion's own voxels only.

- Distance: Euclidean, in mm, on the network grid (spacing-aware distance transform from the lesion's
  network-space mask), so k means the same on any spacing. On a 1 mm grid the study's k-fold dilation with an
  18-connected element reaches k mm along the axes, k*sqrt(2) along face diagonals and about 1.15 k along body
  diagonals; the Euclidean ball reaches k mm in every direction (contained in the study's element).
- Probability and detection in the input's grid, as nnU-Net exports them: the mean lesion probability over the
  lesion's voxels; detected when a predicted component (probability > threshold, the run's connectivity and
  min_size) matches the original lesion under the run's rule (any overlap, or IoU), as `nnxai explain` matches.
- Lesions: the unmasked case is predicted as `nnxai explain` predicts it (nnU-Net's own predictor), so the
  lesions and their groups are those of instances.csv, and `full_*` and `whole_image` rows are nnU-Net's own.
- Cost: of a masked input only the sliding-window tiles near the lesion are predicted (`experiments.predict_near`:
  exact for the lesion and every predicted component touching it, in the differentiable window's float32
  arithmetic, which agrees with nnU-Net's float16 accumulation to its rounding). A k whose kept region is
  unchanged inside those tiles reuses the previous prediction, and once the whole image lies within k mm the
  full prediction itself is used (`whole_image` = True: larger k cannot change anything).
- Required context: the smallest k from which the cohort's detection rate stays >= `plateau_fraction` (0.95)
  of its rate at the largest k; confidence interval: percentiles of that estimate over bootstrap resamples of
  the lesions.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from tqdm import tqdm

from nnxai.experiments.common import (EXPERIMENTS_FOLDER, ExperimentError, LocalPrediction, Prediction,
                                      matching_components, predict, predict_near, run_cases)
from nnxai.explain.cases import check_channels, read_ground_truth
from nnxai.explain.reopen import ReopenedRun
from nnxai.explain.resumable import CohortResult
from nnxai.explain.settings import ExplainSettings
from nnxai.files import write_atomically
from nnxai.lesions.instances import GROUPS, UNKNOWN_GROUP, case_instances, label_components
from nnxai.nnunet.geometry import read_images, to_network_space, voxel_volume_mm3
from nnxai.nnunet.model import LoadedModel
from nnxai.nnunet.sliding_window import Slices, SlidingWindow, TileLayout

EXPERIMENT = "context"
SUMMARY_FILE = "context_summary.json"
COLUMNS = ["case", "lesion_id", "group", "voxels", "volume_mm3", "k_mm", "mean_probability", "detected",
           "whole_image", "full_mean_probability", "full_detected"]


@dataclass(frozen=True)
class ContextDesign:
    """Which lesions (group and size range, in voxels or mm^3) and which context radii k (mm)."""

    groups: tuple[str, ...] = ("TP",)
    min_voxels: int | None = 91
    max_voxels: int | None = 119
    min_mm3: float | None = None
    max_mm3: float | None = None
    max_mm: float = 34.0
    step_mm: float = 1.0

    def __post_init__(self):
        unknown = [g for g in self.groups if g not in (*GROUPS, UNKNOWN_GROUP)]
        if unknown or not self.groups:
            raise ExperimentError(f"groups {list(self.groups)}: choose from {', '.join((*GROUPS, UNKNOWN_GROUP))}")
        if self.step_mm <= 0 or self.max_mm < 0:
            raise ExperimentError(f"need step > 0 mm and max >= 0 mm, got step {self.step_mm}, max {self.max_mm}")

    def k_values(self) -> np.ndarray:
        """0, step, 2 step, ... up to max_mm (mm)."""
        count = int(np.floor(self.max_mm / self.step_mm + 1e-9))
        return np.round(np.arange(count + 1) * self.step_mm, 6)

    def selects(self, group: str, voxels: int, volume_mm3: float) -> bool:
        def within(value, low, high):
            return (low is None or value >= low) and (high is None or value <= high)

        return (group in self.groups and within(voxels, self.min_voxels, self.max_voxels)
                and within(volume_mm3, self.min_mm3, self.max_mm3))


def lesion_outcome(prediction: Prediction | LocalPrediction, lesion: np.ndarray, settings: ExplainSettings) -> dict:
    """Mean probability over the lesion's voxels, and whether a predicted component (after min_size) matches
    the lesion under the run's rule."""
    components = label_components(prediction.binary, settings.connectivity, settings.min_size)
    detected, _ = matching_components(components, lesion, settings)
    return {"mean_probability": float(prediction.probability[lesion].mean()), "detected": detected}


def lesion_context_curve(model: LoadedModel, window: SlidingWindow, full: Prediction, lesion: np.ndarray,
                         k_values: np.ndarray, settings: ExplainSettings) -> list[dict]:
    """One row per k: the lesion's outcome when only the input within k mm of it is kept (see module doc)."""
    properties = full.properties
    network_lesion = to_network_space(model, lesion.astype(np.uint8), properties) > 0
    if not network_lesion.any():  # smaller than a network voxel: take the voxels it touches
        network_lesion = to_network_space(model, ndimage.binary_dilation(lesion).astype(np.uint8), properties) > 0
    spacing = list(model.configuration_manager.spacing)
    if len(spacing) != network_lesion.ndim:
        raise ExperimentError(f"configuration {model.configuration}: the context experiment needs a 3D configuration")
    distance = ndimage.distance_transform_edt(~network_lesion, sampling=spacing)
    layout = window.layout(network_lesion.shape)
    full_outcome = lesion_outcome(full, lesion, settings)
    rows, previous = [], None
    for k in k_values:
        kept = distance <= k + 1e-6
        if kept.all():
            rows.append({"k_mm": float(k), **full_outcome, "whole_image": True})
            continue
        # the prediction near the lesion reads the input of its tiles only: unchanged there, unchanged result
        if previous is None or not np.array_equal(kept[previous["covered"]], previous["kept"]):
            local = predict_near(model, window, full.data * torch.from_numpy(kept), properties, lesion, settings,
                                 layout)
            covered = tiles_union(layout, local.tiles)
            previous = {"covered": covered, "kept": kept[covered], "outcome": lesion_outcome(local, lesion, settings)}
        rows.append({"k_mm": float(k), **previous["outcome"], "whole_image": False})
    return rows


def tiles_union(layout: TileLayout, tiles: list[Slices]) -> np.ndarray:
    """Unpadded network voxels inside any of `tiles`."""
    covered = np.zeros(layout.padded_shape, dtype=bool)
    for tile in tiles:
        covered[tile] = True
    return covered[layout.unpad]


def context_case(model: LoadedModel, window: SlidingWindow, case: str, files: list[Path], settings: ExplainSettings,
                 design: ContextDesign, gt_file: Path | None = None) -> pd.DataFrame:
    """The context curves of one case's selected lesions (instances as `nnxai explain` finds them)."""
    check_channels(files)
    ground_truth = None if gt_file is None else read_ground_truth(model, gt_file, files[0], settings.lesion_label)
    images, properties = read_images(model, files)
    full = predict(model, window, images, properties, settings)
    instances = case_instances(full.binary, ground_truth, settings.connectivity, settings.min_size, settings.rule,
                               settings.iou_threshold)
    voxel_mm3 = voxel_volume_mm3(properties)
    rows = []
    for instance in instances:
        voxels = int(instance.mask.sum())
        if not design.selects(instance.group, voxels, voxels * voxel_mm3):
            continue
        full_outcome = lesion_outcome(full, instance.mask, settings)
        lesion = {"case": case, "lesion_id": instance.instance_id, "group": instance.group, "voxels": voxels,
                  "volume_mm3": voxels * voxel_mm3, "full_mean_probability": full_outcome["mean_probability"],
                  "full_detected": full_outcome["detected"]}
        curve = lesion_context_curve(model, window, full, instance.mask, design.k_values(), settings)
        whole = [row["k_mm"] for row in curve if row["whole_image"]]
        if whole:
            tqdm.write(f"note: {case} lesion {instance.instance_id}: the whole image lies within {whole[0]:g} mm of "
                       f"it; rows from k = {whole[0]:g} mm on repeat the full prediction", file=sys.stderr)
        rows += [{**lesion, **row} for row in curve]
    return pd.DataFrame(rows, columns=COLUMNS)


def context_experiment(run: ReopenedRun, design: ContextDesign, device: str = "cpu", overwrite: bool = False,
                       progress: bool = True, cases: Sequence[str] | None = None) -> tuple[pd.DataFrame, CohortResult]:
    """The context experiment on every case (or those named); writes `OUT/experiments/context.csv` (resumable)."""
    needs_truth = [g for g in design.groups if g in GROUPS]
    if needs_truth and run.gt_dir is None:
        raise ExperimentError(f"groups {', '.join(needs_truth)} need ground truth, and the explain run had none: "
                              f"give the labels folder (--gt) or select --groups {UNKNOWN_GROUP}")
    window = run.window(device)
    parameters = {"design": asdict(design), "settings": asdict(run.settings), "model": run.model.describe(),
                  "ground_truth": run.gt_dir}

    def compute(case: str, files: list[Path]) -> pd.DataFrame:
        return context_case(run.model, window, case, files, run.settings, design, run.gt_file(case))

    return run_cases(run, EXPERIMENT, parameters, cases, compute, overwrite, progress)


def detection_matrix(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(lesions x k) detection as bool, and the k values (mm), from a context table."""
    pivot = table.pivot_table(index=["case", "lesion_id"], columns="k_mm", values="detected", aggfunc="first")
    pivot = pivot.dropna()
    return pivot.to_numpy(dtype=float).astype(bool), pivot.columns.to_numpy(dtype=float)


def required_context_of_rates(rates: np.ndarray, k_values: np.ndarray, plateau_fraction: float = 0.95) -> np.ndarray:
    """Per row of (n x k) detection rates: the smallest k from which the rate stays >= plateau_fraction x its
    rate at the largest k (NaN when that rate is 0: nothing is detected, there is no plateau)."""
    rates = np.atleast_2d(rates)
    holds = rates >= plateau_fraction * rates[:, -1:] - 1e-12
    failing = ~holds
    last_failure = np.where(failing.any(axis=1), rates.shape[1] - 1 - np.argmax(failing[:, ::-1], axis=1), -1)
    required = np.asarray(k_values, dtype=float)[np.minimum(last_failure + 1, rates.shape[1] - 1)]
    return np.where(rates[:, -1] > 0, required, np.nan)


def required_context(detected: np.ndarray, k_values: np.ndarray, plateau_fraction: float = 0.95) -> float:
    """Required context (mm) of a (lesions x k) detection matrix."""
    return float(required_context_of_rates(detected.mean(axis=0), k_values, plateau_fraction)[0])


def bootstrap_required_context(detected: np.ndarray, k_values: np.ndarray, plateau_fraction: float = 0.95,
                               samples: int = 1000, seed: int = 0) -> np.ndarray:
    """The required context of `samples` resamples of the lesions (with replacement); NaN where undefined."""
    lesions = detected.shape[0]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(lesions, np.full(lesions, 1 / lesions), size=samples)
    return required_context_of_rates(counts @ detected.astype(float) / lesions, k_values, plateau_fraction)


def summarize_context(table: pd.DataFrame, plateau_fraction: float = 0.95, bootstrap: int = 1000,
                      confidence: float = 0.95, seed: int = 0) -> dict:
    """Required context with its bootstrap interval, and the cohort curves (detection rate, mean probability)."""
    definition = (f"smallest k (mm) from which the detection rate over the selected lesions stays >= "
                  f"{plateau_fraction:g} x its value at the largest k; interval: {100 * (1 - confidence) / 2:g}th-"
                  f"{100 * (1 + confidence) / 2:g}th percentiles of that estimate over {bootstrap} bootstrap "
                  "resamples of the lesions")
    summary = {"required_context_mm": None, "ci_low": None, "ci_high": None, "confidence": confidence,
               "n_lesions": 0, "n_cases": 0, "bootstrap": bootstrap, "bootstrap_defined": 0,
               "plateau_fraction": plateau_fraction, "definition": definition, "k_mm": [], "detection_rate": [],
               "mean_probability": [], "note": None}
    if table.empty:
        summary["note"] = "no lesion matched the selection"
        return summary
    detected, k_values = detection_matrix(table)
    curves = table.groupby("k_mm")[["detected", "mean_probability"]].mean()
    summary.update(n_lesions=int(detected.shape[0]), n_cases=int(table["case"].nunique()), k_mm=k_values.tolist(),
                   detection_rate=curves["detected"].reindex(k_values).tolist(),
                   mean_probability=curves["mean_probability"].reindex(k_values).tolist())
    estimate = required_context(detected, k_values, plateau_fraction)
    if np.isnan(estimate):
        summary["note"] = f"no selected lesion is detected at k = {k_values[-1]:g} mm: no plateau to reach"
        return summary
    summary["required_context_mm"] = estimate
    if bootstrap > 0:
        replicates = bootstrap_required_context(detected, k_values, plateau_fraction, bootstrap, seed)
        defined = replicates[~np.isnan(replicates)]
        summary["bootstrap_defined"] = int(defined.size)
        if not defined.size:
            return summary
        low, high = np.percentile(defined, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
        summary.update(ci_low=float(low), ci_high=float(high))
    return summary


def write_summary(out_dir: Path, summary: dict) -> Path:
    """`OUT/experiments/context_summary.json`, written atomically."""
    path = Path(out_dir) / EXPERIMENTS_FOLDER / SUMMARY_FILE
    write_atomically(path, json.dumps(summary, indent=2) + "\n")
    return path
