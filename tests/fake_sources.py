"""Tiny fake source trees for the converter tests: 8x8x8 NIfTI volumes under each dataset's real file names."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from click.testing import CliRunner, Result
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnxai.cli import main

SHAPE = (8, 8, 8)
AFFINE = np.diag([1.0, 1.0, 1.2, 1.0])


def lesion(value: float = 1, empty: bool = False) -> np.ndarray:
    """A mask with a 2x2x2 lesion of `value` (or none)."""
    mask = np.zeros(SHAPE, np.float32)
    if not empty:
        mask[3:5, 3:5, 3:5] = value
    return mask


def save(path: Path, data: np.ndarray | None = None, affine: np.ndarray = AFFINE, seed: int = 0) -> Path:
    """Write a NIfTI volume (random intensities unless `data` is given), creating folders as needed."""
    if data is None:
        data = np.random.default_rng(seed).random(SHAPE, dtype=np.float32) * 100
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def save_case(folder: Path, flair: str, t1: str | None, mask: str | None, mask_data: np.ndarray | None = None,
              seed: int = 0) -> None:
    """A FLAIR, a T1 and a mask (T1 or mask left out when their name is None) in `folder`."""
    save(folder / flair, seed=seed)
    if t1 is not None:
        save(folder / t1, seed=seed + 1)
    if mask is not None:
        save(folder / mask, lesion() if mask_data is None else mask_data)


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> content hash (or link target) of every file below `folder`."""
    result = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            result[str(path.relative_to(folder))] = f"-> {Path(path).readlink()}"
        elif path.is_file():
            result[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def run_convert(name: str, source: Path, workspace: Path, *options: str) -> Result:
    """`nnxai convert NAME SOURCE --dataset-id 5 --raw-root ... --preprocessed-root ... OPTIONS`."""
    arguments = ["convert", name, str(source), "--dataset-id", "5", "--raw-root", str(workspace / "raw"),
                 "--preprocessed-root", str(workspace / "preprocessed"), *options]
    return CliRunner().invoke(main, arguments)


def verify_with_nnunet(dataset_dir: Path, capfd) -> str:
    """Run nnU-Net's own dataset check (raises on errors); return what it printed, its workers included."""
    capfd.readouterr()
    verify_dataset_integrity(str(dataset_dir), num_processes=1)
    printed = capfd.readouterr().out
    assert "Error" not in printed and "Warning" not in printed and "WARNING" not in printed, printed
    return printed


def load_splits(workspace: Path, dataset: str) -> list[dict[str, list[str]]]:
    return json.loads((workspace / "preprocessed" / dataset / "splits_final.json").read_text())


def case_ids(folder: Path) -> list[str]:
    """Case ids that have a label file in `folder` (a labelsTr/labelsTs folder)."""
    return sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz")) if folder.exists() else []
