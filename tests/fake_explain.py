"""Explain output folders (`nnxai explain`'s layout) built from hand-made arrays, in milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

CHANNELS = ["FLAIR", "T1"]
ORIGIN = (-10.0, 20.0, 5.0)


def write_image(array: np.ndarray, path: Path, spacing_zyx=(1.0, 1.0, 1.0)) -> None:
    """A (z, y, x) array as NIfTI with the given spacing along the array axes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path))


def write_run(out_dir: Path, channels=CHANNELS, ground_truth: Path | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"settings": {"method": "smoothgrad", "threshold": 0.5, "min_size": 1, "connectivity": 18,
                           "rule": "any", "iou_threshold": 0.25},
              "channels": list(channels), "ground_truth": str(ground_truth) if ground_truth else None}
    (out_dir / "run.json").write_text(json.dumps(record))


def write_case_output(out_dir: Path, case: str, instances: np.ndarray, groups: dict[int, str],
                      maps: dict[int, dict[str, np.ndarray]], spacing_zyx=(1.0, 1.0, 1.0),
                      probabilities: dict[int, float] | None = None, gradcampp: dict[int, np.ndarray] | None = None,
                      prediction: np.ndarray | None = None) -> Path:
    """OUT/<case>/ with prediction, instance ids, instance table and maps; returns the case folder.

    The prediction defaults to the predicted (non-FN) instances.
    """
    case_dir = out_dir / case
    voxel_volume = float(np.prod(spacing_zyx))
    if prediction is None:
        prediction = np.isin(instances, [i for i, g in groups.items() if g != "FN"])
    write_image(prediction.astype(np.uint8), case_dir / "prediction.nii.gz", spacing_zyx)
    write_image(instances.astype(np.uint16), case_dir / "instances.nii.gz", spacing_zyx)
    for instance_id, channel_maps in maps.items():
        for channel, volume in channel_maps.items():
            write_image(volume.astype(np.float32), case_dir / "smoothgrad" / f"{instance_id:03d}_{channel}.nii.gz",
                        spacing_zyx)
    for instance_id, volume in (gradcampp or {}).items():
        write_image(volume.astype(np.float32), case_dir / "gradcampp" / f"{instance_id:03d}.nii.gz", spacing_zyx)
    rows = [{"case": case, "instance_id": i, "group": g, "voxels": int((instances == i).sum()),
             "volume_mm3": int((instances == i).sum()) * voxel_volume,
             "mean_probability": (probabilities or {}).get(i, 0.9)} for i, g in groups.items()]
    pd.DataFrame(rows, columns=["case", "instance_id", "group", "voxels", "volume_mm3", "mean_probability"]).to_csv(
        case_dir / "instances.csv", index=False)
    return case_dir
