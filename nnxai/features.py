"""Per-instance features from the saliency maps of an explain output folder (issue 6, item 3).

For every predicted instance (TP, FP or unknown; FN lesions were never predicted, so there is nothing to
filter) of every case in `OUT`:

- first-order statistics (`STATISTICS`) of each channel's SmoothGrad map inside the instance and in its
  shell, the voxels outside it whose centre lies within `shell_mm` (default 2 mm) of an instance voxel's
  centre (Euclidean distance transform with the image spacing, so the shell is in mm on any grid);
- the same statistics of the Grad-CAM++ map when the folder holds Grad-CAM++ maps;
- ``log_volume_mm3`` (the natural log of the instance volume) and ``mean_probability``, from the explain table.

Maps are read in the input geometry the explain run wrote them in. Column names:
``<method>_<CHANNEL>_<region>_<statistic>`` for SmoothGrad, ``gradcampp_<region>_<statistic>`` for Grad-CAM++.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage, stats
from tqdm import tqdm

RUN_RECORD = "run.json"
CASE_TABLE = "instances.csv"
INSTANCE_IMAGE = "instances.nii.gz"
SMOOTHGRAD = "smoothgrad"
GRADCAMPP = "gradcampp"
REGIONS = ("inside", "shell")
STATISTICS = ("mean", "std", "median", "p10", "p90", "skewness", "kurtosis", "peak_pos", "peak_neg")
IDENTITY_COLUMNS = ("case", "instance_id", "group")
PREDICTED_GROUPS = ("TP", "FP", "unknown")
DEFAULT_SHELL_MM = 2.0


class FeatureError(ValueError):
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


def shell_mask(mask: np.ndarray, spacing: Iterable[float], width_mm: float) -> np.ndarray:
    """Voxels outside `mask` whose centre is within `width_mm` of the centre of a `mask` voxel.

    `spacing` is the voxel size along the array axes, in mm.
    """
    distance = ndimage.distance_transform_edt(~mask, sampling=tuple(spacing))
    return (distance > 0) & (distance <= width_mm + 1e-6)


def instance_regions(instances: np.ndarray, instance_id: int, spacing: tuple[float, ...],
                     shell_mm: float) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """A box around one instance with room for its shell, and its inside and shell masks within that box."""
    mask = instances == instance_id
    if not mask.any():
        raise ValueError(f"instance {instance_id} has no voxel")
    margin = [math.ceil(shell_mm / s) + 1 for s in spacing]
    box = tuple(slice(max(int(index.min()) - m, 0), min(int(index.max()) + m + 1, size))
                for index, m, size in zip(np.nonzero(mask), margin, mask.shape))
    inside = mask[box]
    return box, inside, shell_mask(inside, spacing, shell_mm)


def region_features(volume: np.ndarray, box: tuple[slice, ...], inside: np.ndarray, shell: np.ndarray,
                    prefix: str) -> dict[str, float]:
    """`STATISTICS` of `volume` inside the instance and in its shell, as `<prefix>_<region>_<statistic>`."""
    cropped = volume[box]
    features = {}
    for region, mask in zip(REGIONS, (inside, shell)):
        for statistic, value in first_order_statistics(cropped[mask]).items():
            features[f"{prefix}_{region}_{statistic}"] = value
    return features


def smoothgrad_path(case_dir: Path, instance_id: int, channel: str) -> Path:
    """Where `nnxai explain` writes an instance's SmoothGrad map of one channel."""
    return case_dir / SMOOTHGRAD / f"{instance_id:03d}_{channel}.nii.gz"


def gradcampp_path(case_dir: Path, instance_id: int) -> Path:
    """Where `nnxai explain --method gradcampp` writes an instance's Grad-CAM++ map."""
    return case_dir / GRADCAMPP / f"{instance_id:03d}.nii.gz"


def read_volume(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A volume as a (z, y, x) array, checked to be on the instance image's grid."""
    if not path.is_file():
        raise FeatureError(f"{path}: missing")
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        raise FeatureError(f"{path}: not a readable image") from None
    if array.shape != shape:
        raise FeatureError(f"{path}: shape {array.shape} differs from the instance image's {shape}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{path}: contains NaN or Inf")
    return array


def read_run(out_dir: Path) -> dict:
    """The run record of an explain output folder (its channels and settings)."""
    path = Path(out_dir) / RUN_RECORD
    if not path.is_file():
        raise FeatureError(f"{path}: missing; {out_dir} is not an nnxai explain output folder")
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise FeatureError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("channels"), list):
        raise FeatureError(f"{path}: not an explain run record (no list of channels)")
    return record


def case_tables(out_dir: Path) -> dict[str, pd.DataFrame]:
    """Case id -> instance table of every finished case (hidden, unfinished case folders are skipped)."""
    tables = {}
    for path in sorted(Path(out_dir).glob(f"*/{CASE_TABLE}")):
        if path.parent.name.startswith("."):
            continue
        table = pd.read_csv(path, dtype={"case": str})
        missing = [c for c in (*IDENTITY_COLUMNS, "volume_mm3", "mean_probability") if c not in table.columns]
        if missing:
            raise FeatureError(f"{path}: missing column(s) {', '.join(missing)}")
        tables[path.parent.name] = table
    if not tables:
        raise FeatureError(f"{out_dir}: no finished case (no */{CASE_TABLE})")
    return tables


def maps_present(out_dir: Path, method: str) -> bool:
    """Whether any case of the folder has maps of `method`."""
    return any(p.is_dir() for p in Path(out_dir).glob(f"[!.]*/{method}"))


def case_features(case_dir: Path, table: pd.DataFrame, channels: list[str], smoothgrad: bool, gradcampp: bool,
                  shell_mm: float = DEFAULT_SHELL_MM) -> list[dict]:
    """Feature rows of the predicted instances of one case folder."""
    predicted = table[table["group"].isin(PREDICTED_GROUPS)]
    if predicted.empty:
        return []
    instance_path = case_dir / INSTANCE_IMAGE
    if not instance_path.is_file():
        raise FeatureError(f"{instance_path}: missing")
    instance_image = sitk.ReadImage(str(instance_path))
    instances = sitk.GetArrayFromImage(instance_image)
    spacing = instance_image.GetSpacing()[::-1]  # array axes are (z, y, x)
    rows = []
    for row in predicted.itertuples(index=False):
        try:
            box, inside, shell = instance_regions(instances, int(row.instance_id), spacing, shell_mm)
        except ValueError as error:
            raise FeatureError(f"{instance_path}: {error}") from None
        if not shell.any():
            raise FeatureError(f"{instance_path}: instance {row.instance_id} fills the image, no shell")
        features = {"case": case_dir.name, "instance_id": int(row.instance_id), "group": row.group}
        if smoothgrad:
            for channel in channels:
                volume = read_volume(smoothgrad_path(case_dir, row.instance_id, channel), instances.shape)
                features.update(region_features(volume, box, inside, shell, f"{SMOOTHGRAD}_{channel}"))
        if gradcampp:
            volume = read_volume(gradcampp_path(case_dir, row.instance_id), instances.shape)
            features.update(region_features(volume, box, inside, shell, GRADCAMPP))
        if not row.volume_mm3 > 0 or not np.isfinite(row.mean_probability):
            raise FeatureError(f"{case_dir / CASE_TABLE}: instance {row.instance_id} has volume {row.volume_mm3} "
                               f"and mean probability {row.mean_probability}")
        features["log_volume_mm3"] = math.log(row.volume_mm3)
        features["mean_probability"] = float(row.mean_probability)
        rows.append(features)
    return rows


def instance_features(out_dir: Path, shell_mm: float = DEFAULT_SHELL_MM, progress: bool = False) -> pd.DataFrame:
    """The feature table of every predicted instance of an explain output folder (one row per instance).

    SmoothGrad and Grad-CAM++ features are included when any case has maps of that method; then every
    predicted instance must have them.
    """
    out_dir = Path(out_dir)
    channels = list(read_run(out_dir)["channels"])
    tables = case_tables(out_dir)
    smoothgrad, gradcampp = maps_present(out_dir, SMOOTHGRAD), maps_present(out_dir, GRADCAMPP)
    if not (smoothgrad or gradcampp) and any(t["group"].isin(PREDICTED_GROUPS).any() for t in tables.values()):
        raise FeatureError(f"{out_dir}: no {SMOOTHGRAD}/ or {GRADCAMPP}/ maps in any case folder")
    rows = []
    for case, table in tqdm(tables.items(), desc=f"features {out_dir.name}", unit="case", disable=not progress):
        rows += case_features(out_dir / case, table, channels, smoothgrad, gradcampp, shell_mm)
    columns = list(IDENTITY_COLUMNS) + feature_columns(channels, smoothgrad, gradcampp)
    return pd.DataFrame(rows, columns=columns)


def feature_columns(channels: list[str], smoothgrad: bool = True, gradcampp: bool = False) -> list[str]:
    """Names of the feature columns, in table order."""
    prefixes = ([f"{SMOOTHGRAD}_{c}" for c in channels] if smoothgrad else []) + ([GRADCAMPP] if gradcampp else [])
    return [f"{p}_{r}_{s}" for p in prefixes for r in REGIONS for s in STATISTICS] + ["log_volume_mm3",
                                                                                     "mean_probability"]
