"""Tiny fake nnU-Net datasets for trainer and plans tests: two channels, bright blobs as lesions.

Callers point nnUNet_raw / nnUNet_preprocessed / nnUNet_results at temporary folders first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np


def blob_case(shape: tuple[int, int, int], rng: np.random.Generator, n_blobs: int = 3) -> tuple[np.ndarray, ...]:
    """A (FLAIR-like, T1-like, label) triple: a noisy ellipsoid 'brain' with `n_blobs` bright spheres as lesions."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.8
    label = np.zeros(shape, np.uint8)
    for _ in range(n_blobs):
        centre = rng.uniform(-0.5, 0.5, 3)[:, None, None, None]
        radius = rng.uniform(0.08, 0.18)
        label |= (((grid - centre) ** 2).sum(0) < radius ** 2) & brain
    flair = brain * 100.0 + label * 80.0 + rng.normal(0, 5, shape)
    t1 = brain * 120.0 - label * 40.0 + rng.normal(0, 5, shape)
    return flair.astype(np.float32), t1.astype(np.float32), label


SPACING = 1.5


def write_fake_raw_dataset(dataset_id: int, name: str = "Fake", n_cases: int = 4,
                           shape: tuple[int, int, int] = (40, 48, 40), seed: int = 0) -> str:
    """Write `$nnUNet_raw/DatasetNNN_name` with `n_cases` blob cases; returns the dataset folder name."""
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    folder = Path(os.environ["nnUNet_raw"], folder_name)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    for index in range(n_cases):
        flair, t1, label = blob_case(shape, rng)
        case = f"case_{index:03d}"
        nib.save(nib.Nifti1Image(flair, affine), folder / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(t1, affine), folder / "imagesTr" / f"{case}_0001.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"{case}.nii.gz")
    dataset_json = {"channel_names": {"0": "FLAIR", "1": "T1"}, "labels": {"background": 0, "lesion": 1},
                    "numTraining": n_cases, "file_ending": ".nii.gz", "name": name}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder_name


def write_fake_fingerprint(dataset_id: int, n_cases: int = 2, shape: tuple[int, int, int] = (40, 48, 40)) -> Path:
    """Raw dataset plus a hand-written `dataset_fingerprint.json`; returns the dataset's preprocessed folder.

    nnU-Net's planners then skip fingerprint extraction (a spawned worker pool: tens of seconds on a busy
    2-core machine).
    """
    folder_name = write_fake_raw_dataset(dataset_id, n_cases=n_cases, shape=shape)
    intensities = {"max": 200.0, "mean": 150.0, "median": 150.0, "min": 50.0, "percentile_00_5": 60.0,
                   "percentile_99_5": 190.0, "std": 30.0}
    fingerprint = {"foreground_intensity_properties_per_channel": {"0": intensities, "1": intensities},
                   "median_relative_size_after_cropping": 1.0,
                   "shapes_after_crop": [list(shape)] * n_cases, "spacings": [[SPACING] * 3] * n_cases}
    preprocessed = Path(os.environ["nnUNet_preprocessed"], folder_name)
    preprocessed.mkdir(parents=True, exist_ok=True)
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return preprocessed


def plan_fake_dataset(dataset_id: int, n_cases: int = 2, shape: tuple[int, int, int] = (40, 48, 40)) -> Path:
    """Fake dataset and fingerprint, then nnU-Net's own experiment planner; returns nnUNetPlans.json."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    preprocessed = write_fake_fingerprint(dataset_id, n_cases, shape)
    plan_experiment_dataset(dataset_id)
    return preprocessed / "nnUNetPlans.json"
