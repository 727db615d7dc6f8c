"""Ring analysis (SPEC 5.1): an instance's saliency inside the lesion and in 1 mm shells around its border.

Shell 0 is the instance's own voxels. Shell k (k = 1 ... max_mm) holds the voxels outside the instance whose
centre lies more than k - 1 and at most k mm from the centre of the nearest instance voxel, measured with
the voxel spacing of the written maps (Euclidean distance transform with `sampling=spacing`). On a 1 x 1 x 2 mm
grid, shell 1 therefore holds only in-plane neighbours and the neighbours across slices fall into shell 2.

Voxels of other instances of the same case (other predicted lesions and missed ground-truth lesions) are
left out of every shell: the shells describe the tissue around one lesion, not its neighbours. The distance
itself is measured to this instance only, so a shell continues behind a neighbouring lesion.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from nnxai.explain.output import AnalysisInputError, ExplainOutput, read_volume
from nnxai.files import write_atomically

RINGS_TABLE = "rings.csv"
RING_COLUMNS = ["method", "case", "instance_id", "group", "channel", "shell_mm", "mean", "median", "min", "max",
                "voxels"]
OUTSIDE = -1
DISTANCE_TOLERANCE_MM = 1e-6  # a voxel exactly k mm away belongs to shell k despite rounding in the transform


def shell_labels(mask: np.ndarray, spacing: tuple[float, ...], max_mm: int,
                 excluded: np.ndarray | None = None) -> np.ndarray:
    """Per voxel: 0 inside `mask`, k for the shell (k - 1, k] mm outside it, OUTSIDE beyond max_mm or excluded.

    Only a box around the mask, `max_mm` wider on every side, is transformed: every voxel within `max_mm`
    of the mask lies in it, and so does the mask, so distances up to `max_mm` are exact.
    """
    labels = np.full(mask.shape, OUTSIDE, dtype=np.int16)
    if not mask.any():
        return labels
    box = []
    for axis, step in enumerate(spacing):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        margin = math.ceil(max_mm / step) + 1
        box.append(slice(max(present[0] - margin, 0), min(present[-1] + margin + 1, mask.shape[axis])))
    box = tuple(box)
    distance = distance_transform_edt(~mask[box], sampling=spacing)
    shells = np.ceil(distance - DISTANCE_TOLERANCE_MM).astype(np.int16)
    shells[shells > max_mm] = OUTSIDE
    labels[box] = shells
    if excluded is not None:
        labels[excluded & ~mask] = OUTSIDE
    return labels


def shell_statistics(saliency: np.ndarray, shells: np.ndarray, max_mm: int) -> list[dict]:
    """Mean, median, min, max and voxel count of `saliency` in shells 0 ... max_mm (NaN for an empty shell)."""
    rows = []
    for shell in range(max_mm + 1):
        values = saliency[shells == shell]
        row = {"shell_mm": shell, "voxels": int(values.size)}
        if values.size:
            row.update(mean=float(values.mean()), median=float(np.median(values)), min=float(values.min()),
                       max=float(values.max()))
        else:
            row.update(mean=np.nan, median=np.nan, min=np.nan, max=np.nan)
        rows.append(row)
    return rows


def case_rings(output: ExplainOutput, case: str, instances: pd.DataFrame, max_mm: int, method: str) -> list[dict]:
    """Ring rows of every listed instance of one case and every channel."""
    labels_path = output.instance_labels_path(case)
    labels, spacing, _ = read_volume(labels_path)
    rows = []
    for instance in instances.itertuples():
        mask = labels == instance.instance_id
        shells = shell_labels(mask, spacing, max_mm, excluded=labels != 0)
        for channel in output.channels:
            path = output.map_path(case, instance.instance_id, channel, method)
            saliency, map_spacing, _ = read_volume(path)
            if saliency.shape != labels.shape or not np.allclose(map_spacing, spacing, atol=1e-4):
                raise AnalysisInputError(f"{path}: grid {saliency.shape} / {map_spacing} differs from "
                                         f"{labels_path.name} ({labels.shape} / {spacing})")
            key = {"method": method, "case": case, "instance_id": int(instance.instance_id),
                   "group": instance.group, "channel": channel}
            rows += [{**key, **row} for row in shell_statistics(np.asarray(saliency, dtype=np.float64), shells, max_mm)]
    return rows


def ring_table(output: ExplainOutput, max_mm: int = 10, method: str | None = None,
               progress: bool = False) -> pd.DataFrame:
    """The tidy ring table of a whole explain output (one row per instance, channel and shell)."""
    if max_mm < 1:
        raise AnalysisInputError(f"--max-mm must be at least 1, got {max_mm}")
    method = method or output.method
    rows: list[dict] = []
    cases = output.instances.groupby("case", sort=True)
    for case, instances in tqdm(cases, desc="rings", unit="case", disable=not progress):
        rows += case_rings(output, str(case), instances, max_mm, method)
    return pd.DataFrame(rows, columns=RING_COLUMNS)


def write_rings(output: ExplainOutput, table: pd.DataFrame) -> Path:
    """OUT/rings.csv, written atomically."""
    path = output.folder / RINGS_TABLE
    write_atomically(path, lambda p: table.to_csv(p, index=False))
    return path
