"""Writing datasets in nnU-Net v2's raw format, shared by every converter.

A dataset is written into a staging folder next to its final place and renamed into place only when
complete, so an interrupted or failed conversion never leaves a half-written dataset behind and a re-run
replaces the previous result as a whole.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import click
import nibabel as nib
import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

CHANNEL_NAMES = {"0": "FLAIR", "1": "T1"}
LESION_LABELS = {"background": 0, "lesion": 1}
FILE_ENDING = ".nii.gz"


class ConversionError(click.ClickException):
    """Bad input or an unwritable output: a one-line message naming the file and the problem."""


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset, e.g. (901, "MSPhantom") -> "Dataset901_MSPhantom"."""
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id {dataset_id}: nnU-Net needs an id between 1 and 999")
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConversionError(f"dataset name {name!r}: use letters, digits, '-' and '_' only")
    return f"Dataset{dataset_id:03d}_{name}"


def resolve_raw_root(explicit: Path | None) -> Path:
    """The nnU-Net raw folder: `explicit` if given, else $nnUNet_raw, else a clear error."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("nnUNet_raw"):
        return Path(os.environ["nnUNet_raw"])
    raise ConversionError("no output folder: pass --raw-root or set the nnUNet_raw environment variable")


def resolve_preprocessed_root(explicit: Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("nnUNet_preprocessed"):
        return Path(os.environ["nnUNet_preprocessed"])
    raise ConversionError("no place for splits_final.json: set the nnUNet_preprocessed environment variable")


@contextmanager
def staged_dataset(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    except OSError as error:
        raise ConversionError(f"{target.parent}: cannot write the dataset there ({error.strerror})") from error
    try:
        yield staging
        staging.chmod(0o777 & ~_current_umask())
        _replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is moved aside first and deleted only afterwards."""
    if not target.exists():
        new.rename(target)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
    aside = previous / target.name
    target.rename(aside)
    try:
        new.rename(target)
    except OSError:
        aside.rename(target)
        raise
    finally:
        shutil.rmtree(previous, ignore_errors=True)


def _write_nifti(source: nib.Nifti1Image | Path, destination: Path, link: bool) -> None:
    """Write one volume as .nii.gz: save an image, link or copy a .nii.gz file, compress a .nii file."""
    if isinstance(source, nib.Nifti1Image):
        nib.save(source, destination)
        return
    source = Path(source)
    if source.name.endswith(FILE_ENDING):
        if link:
            destination.symlink_to(source.resolve())
        else:
            shutil.copyfile(source, destination)
    else:
        nib.save(nib.load(source), destination)


def write_case(dataset_dir: Path, case_id: str, images: Sequence[nib.Nifti1Image | Path],
               label: nib.Nifti1Image | Path | None, test: bool = False, link: bool = False) -> None:
    """Write one case: images{Tr,Ts}/CASE_0000.nii.gz, CASE_0001.nii.gz ... and labels{Tr,Ts}/CASE.nii.gz.

    Images and labels given as files are copied (or symlinked with `link`, for .nii.gz files); .nii files
    are compressed, because an nnU-Net dataset has one file ending.
    """
    if not case_id or "/" in case_id or case_id.startswith("."):
        raise ConversionError(f"case id {case_id!r}: not usable as a file name")
    suffix = "Ts" if test else "Tr"
    images_dir = Path(dataset_dir, f"images{suffix}")
    images_dir.mkdir(exist_ok=True)
    for channel, image in enumerate(images):
        _write_nifti(image, images_dir / f"{case_id}_{channel:04d}{FILE_ENDING}", link)
    if label is not None:
        labels_dir = Path(dataset_dir, f"labels{suffix}")
        labels_dir.mkdir(exist_ok=True)
        _write_nifti(label, labels_dir / f"{case_id}{FILE_ENDING}", link)


def write_dataset_json(dataset_dir: Path, num_training: int, name: str, channel_names=CHANNEL_NAMES,
                       labels=LESION_LABELS, file_ending=FILE_ENDING, **extra) -> None:
    """Write dataset.json with nnU-Net's own generator; `extra` keys (description, reference, ...) are kept."""
    generate_dataset_json(str(dataset_dir), dict(channel_names), dict(labels), num_training, file_ending,
                          dataset_name=name, license=extra.pop("license", "see the source dataset's terms"),
                          converted_by=extra.pop("converted_by", "nnxai"), **extra)


def write_splits(dataset_name: str, splits: list[dict[str, list[str]]], preprocessed_root: Path | None = None) -> Path:
    """Write $nnUNet_preprocessed/DATASET/splits_final.json (atomically) and return its path."""
    for fold, split in enumerate(splits):
        if set(split) != {"train", "val"}:
            raise ValueError(f"fold {fold} of the splits must have exactly the keys 'train' and 'val'")
    folder = resolve_preprocessed_root(preprocessed_root) / dataset_name
    path = folder / "splits_final.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".splits_final.", suffix=".json", dir=folder)
        with os.fdopen(handle, "w") as stream:
            json.dump([{"train": list(s["train"]), "val": list(s["val"])} for s in splits], stream, indent=2)
        os.replace(temporary, path)
    except OSError as error:
        raise ConversionError(f"{path}: cannot write the splits ({error.strerror})") from error
    return path


def _patients_for(fraction: float, num_patients: int) -> int:
    """Patients a non-zero fraction gets: the rounded share, but at least one."""
    if fraction == 0:
        return 0
    return max(1, int(np.floor(fraction * num_patients + 0.5)))


def patient_split(case_to_patient: dict[str, str], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[str]]:
    """Split case ids into train/val/test by patient, so that all scans of a patient land in the same set.

    Fractions count patients; a non-zero fraction gets at least one patient and at least one patient is
    left for training. The same cases, fractions and seed always give the same split.
    """
    for label, fraction in (("validation", val_fraction), ("test", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{label} fraction {fraction} must be in [0, 1)")
    patients = sorted(set(case_to_patient.values()))
    num_test = _patients_for(test_fraction, len(patients))
    num_val = _patients_for(val_fraction, len(patients))
    if num_test + num_val >= len(patients):
        raise ValueError(f"{len(patients)} patients are too few for a validation fraction of {val_fraction} "
                         f"and a test fraction of {test_fraction} with at least one patient left for training")
    order = np.random.default_rng(seed).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    role_of_patient = {p: "test" for p in shuffled[:num_test]}
    role_of_patient.update({p: "val" for p in shuffled[num_test:num_test + num_val]})
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for case_id in sorted(case_to_patient):
        split[role_of_patient.get(case_to_patient[case_id], "train")].append(case_id)
    return split
