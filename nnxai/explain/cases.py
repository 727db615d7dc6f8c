"""The cases of an nnU-Net input folder: finding them, splitting them into parts, and refusing in one line the
files that cannot be explained (missing or NaN channels, channels or ground truth on another grid)."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from nnxai.errors import InputError
from nnxai.nnunet.model import LoadedModel

# How far two image headers may differ and still describe one grid (voxels, mm, mm, cosines)
GRID_TOLERANCES = {"size": 0, "spacing": 1e-4, "origin": 1e-3, "direction": 1e-4}


class CaseError(InputError):
    """A case that cannot be explained; the message names the file and the cause in one line."""


def find_cases(images_dir: Path, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """Cases of an nnU-Net input folder (`CASE_XXXX<ending>`); a case may lack channels (checked later).

    Sorted by case name as nnUNetv2_predict sorts them (not by file name: `a-1_0000` sorts before `a_0000`),
    so that -num_parts/-part_id give the same parts.
    """
    if not images_dir.is_dir():
        raise CaseError(f"{images_dir}: no such input folder")
    names = {path.name[: -len(file_ending) - 5] for path in images_dir.glob(f"*_[0-9][0-9][0-9][0-9]{file_ending}")}
    return {case: [images_dir / f"{case}_{channel:04d}{file_ending}" for channel in range(num_channels)]
            for case in sorted(names)}


def shard(cases: list[str], num_parts: int, part_id: int) -> list[str]:
    """The cases of one part, exactly as nnUNetv2_predict splits them (`cases[part_id::num_parts]`)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in [0, num_parts), got part_id={part_id}, num_parts={num_parts}")
    return cases[part_id::num_parts]


def check_channels(files: list[Path]) -> None:
    """Every channel present, finite, and all channels on one grid (size, spacing, origin, direction)."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CaseError(f"{missing[0]}: missing channel file")
    for path in files:
        check_finite(path)
    for path in files[1:]:
        check_same_grid(path, files[0])


def check_same_grid(path: Path, reference: Path) -> None:
    """Refuse `path` in one line unless its header puts it on `reference`'s grid (size, spacing, origin, direction)."""
    expected, header = _header(reference), _header(path)
    for key, tolerance in GRID_TOLERANCES.items():
        if not np.allclose(expected[key], header[key], atol=tolerance, rtol=0):
            raise CaseError(f"{path}: {key} {header[key]} differs from {expected[key]} in {reference.name}")


def check_finite(path: Path) -> None:
    """Refuse NaN/Inf voxels, which SimpleITK would silently read as 0 (NIfTI files with a float type)."""
    if not path.name.endswith((".nii", ".nii.gz")):
        return
    image = nib.load(path)
    if image.get_data_dtype().kind == "f" and not np.isfinite(np.asanyarray(image.dataobj)).all():
        raise CaseError(f"{path}: contains NaN or Inf voxels")


def _header(path: Path) -> dict:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CaseError(f"{path}: not a readable image") from None
    return {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
            "direction": reader.GetDirection()}


def read_ground_truth(model: LoadedModel, gt_file: Path, image_file: Path, lesion_label: int) -> np.ndarray:
    """Binary ground truth in the input's array layout; refuses, like a channel, a mask on another grid than
    `image_file` (a channel of the case)."""
    if not gt_file.is_file():
        raise CaseError(f"{gt_file}: ground-truth mask missing")
    check_same_grid(gt_file, image_file)
    labels, _ = model.plans_manager.image_reader_writer_class().read_seg([os.fspath(gt_file)])
    return labels[0] == lesion_label
