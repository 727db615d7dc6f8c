"""Per-instance features from the saliency maps of an explain output folder (issue 6, item 3).

For every predicted instance (TP, FP or unknown; FN lesions were never predicted, so there is nothing to
filter) of every case in `OUT`:

- first-order statistics (`STATISTICS`) of each channel's SmoothGrad map inside the instance and in its
  shell: the voxels outside it within `shell_mm` (default 2) mm of it, as `nnxai.analysis.rings` defines shells
  (spacing-aware distance transform; voxels of other instances of the case left out);
- the same statistics of the Grad-CAM++ map when the folder holds Grad-CAM++ maps;
- ``log_volume_mm3`` (the natural log of the instance volume) and ``mean_probability``, from the explain table;
- the uncertainty columns of the explain table (``nnxai.explain.uncertainty``) that it holds for its predicted instances:
  ``fold_std_probability`` (fold ensembles only) and ``mean_entropy``.

Maps are read in the input geometry the explain run wrote them in. Column names:
``smoothgrad_<CHANNEL>_<region>_<statistic>`` and ``gradcampp_<region>_<statistic>``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from nnxai.analysis.rings import shell_labels
from nnxai.errors import InputError
from nnxai.explain.output import (AnalysisInputError, ExplainOutput, load_explain_output, method_channels, read_volume,
                                  require_columns, statistic_prefix)
from nnxai.explain.settings import METHODS
from nnxai.explain.uncertainty import UNCERTAINTY_COLUMNS

REGIONS = ("inside", "shell")
STATISTICS = ("mean", "std", "median", "p10", "p90", "skewness", "kurtosis", "peak_pos", "peak_neg")
IDENTITY_COLUMNS = ("case", "instance_id", "group")
PREDICTED_GROUPS = ("TP", "FP", "unknown")
DEFAULT_SHELL_MM = 2
SPACING_TOLERANCE = 1e-4


class FeatureError(InputError, ValueError):
    """An explain output folder whose instances cannot be featurized; the message names the file."""


def first_order_statistics(values: np.ndarray) -> dict[str, float]:
    """`STATISTICS` of a non-empty set of values; skewness and (excess) kurtosis are 0 for constant values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no values")
    spread = float(values.std())
    constant = spread <= 1e-12 * max(1.0, float(np.abs(values).max()))
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"mean": float(values.mean()), "std": spread, "median": float(median), "p10": float(p10),
            "p90": float(p90), "skewness": 0.0 if constant else float(stats.skew(values)),
            "kurtosis": 0.0 if constant else float(stats.kurtosis(values)),
            "peak_pos": float(values.max()), "peak_neg": float(values.min())}


def instance_regions(labels: np.ndarray, instance_id: int, spacing: tuple[float, ...],
                     shell_mm: int) -> tuple[np.ndarray, np.ndarray]:
    """The instance's voxels and its shell: voxels outside any instance within `shell_mm` mm of it."""
    inside = labels == instance_id
    return inside, shell_labels(inside, spacing, shell_mm, excluded=labels != 0) > 0


def region_features(volume: np.ndarray, inside: np.ndarray, shell: np.ndarray, prefix: str) -> dict[str, float]:
    """`STATISTICS` of `volume` inside the instance and in its shell, as `<prefix>_<region>_<statistic>`."""
    return {f"{prefix}_{region}_{statistic}": value
            for region, mask in zip(REGIONS, (inside, shell))
            for statistic, value in first_order_statistics(volume[mask]).items()}


def read_map(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """A saliency map, checked to be finite and on the instance image's grid."""
    volume, map_spacing, _ = read_volume(path)
    if volume.shape != shape or not np.allclose(map_spacing, spacing, atol=SPACING_TOLERANCE):
        raise FeatureError(f"{path}: grid {volume.shape} / {map_spacing} differs from the instance image's "
                           f"({shape} / {spacing})")
    volume = np.asarray(volume, dtype=np.float64)
    if not np.isfinite(volume).all():
        raise FeatureError(f"{path}: contains NaN or Inf")
    return volume


def maps_present(output: ExplainOutput, method: str) -> bool:
    """Whether any case of the folder has maps of `method`."""
    return any(p.is_dir() for p in output.folder.glob(f"[!.]*/{method}"))


def case_features(output: ExplainOutput, case: str, instances: pd.DataFrame, methods: tuple[str, ...],
                  shell_mm: int = DEFAULT_SHELL_MM, uncertainty: tuple[str, ...] = ()) -> list[dict]:
    """Feature rows of the predicted instances of one case."""
    labels_path = output.instance_labels_path(case)
    labels, spacing, _ = read_volume(labels_path)
    rows = []
    for row in instances.itertuples(index=False):
        inside, shell = instance_regions(labels, int(row.instance_id), spacing, shell_mm)
        if not inside.any() or not shell.any():
            raise FeatureError(f"{labels_path}: instance {row.instance_id} has "
                               f"{'no voxel' if not inside.any() else 'no shell (it fills the image)'}")
        if not row.volume_mm3 > 0 or not np.isfinite(row.mean_probability):
            raise FeatureError(f"{output.folder / 'instances.csv'}: case {case} instance {row.instance_id} has "
                               f"volume {row.volume_mm3} and mean probability {row.mean_probability}")
        features = {"case": case, "instance_id": int(row.instance_id), "group": row.group}
        for method in methods:
            for channel, path in output.map_files(case, row.instance_id, method).items():
                volume = read_map(path, labels.shape, spacing)
                features.update(region_features(volume, inside, shell, statistic_prefix(method, channel)))
        features["log_volume_mm3"] = math.log(row.volume_mm3)
        features["mean_probability"] = float(row.mean_probability)
        features.update({column: float(getattr(row, column)) for column in uncertainty})
        rows.append(features)
    return rows


def instance_features(out_dir: Path, shell_mm: int = DEFAULT_SHELL_MM, progress: bool = False) -> pd.DataFrame:
    """The feature table of every predicted instance of an explain output folder (one row per instance).

    SmoothGrad and Grad-CAM++ features are included when any case has maps of that method; then every
    predicted instance must have them.
    """
    try:
        output = load_explain_output(Path(out_dir))
        require_columns(output.instances, ("volume_mm3", "mean_probability"), output.folder / "instances.csv")
        predicted = output.instances[output.instances["group"].isin(PREDICTED_GROUPS)]
        methods = tuple(method for method in METHODS if maps_present(output, method))
        uncertainty = tuple(c for c in UNCERTAINTY_COLUMNS if c in predicted and predicted[c].notna().any())
        if not methods and not predicted.empty:
            raise FeatureError(f"{out_dir}: no {'/ or '.join(METHODS)}/ maps in any case folder")
        rows = []
        for case, instances in tqdm(predicted.groupby("case", sort=True), desc=f"features {Path(out_dir).name}",
                                    unit="case", disable=not progress):
            rows += case_features(output, str(case), instances, methods, shell_mm, uncertainty)
    except AnalysisInputError as error:
        raise FeatureError(str(error)) from None
    columns = list(IDENTITY_COLUMNS) + feature_columns(output.channels, methods, uncertainty)
    return pd.DataFrame(rows, columns=columns)


def feature_columns(channels: list[str], methods: tuple[str, ...] = ("smoothgrad",),
                    uncertainty: tuple[str, ...] = ()) -> list[str]:
    """Names of the feature columns, in table order."""
    prefixes = [statistic_prefix(method, channel)
                for method in methods for channel in method_channels(method, channels)]
    return [f"{p}_{r}_{s}" for p in prefixes for r in REGIONS for s in STATISTICS] + [
        "log_volume_mm3", "mean_probability", *uncertainty]
