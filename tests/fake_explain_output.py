"""Explain output folders built by hand (run.json, tables, NIfTI instances and maps), for the analysis tests."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

CHANNELS = ("FLAIR", "T1")
METHOD = "smoothgrad"


@dataclass
class FakeInstance:
    """One instance: its id, group, mask and one saliency map per channel (nibabel array order)."""

    instance_id: int
    group: str
    mask: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)


def save(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def write_output(out: Path, cases: dict[str, list[FakeInstance]], spacing=(1.0, 1.0, 1.0), channels=CHANNELS,
                 images: dict[str, np.ndarray] | None = None) -> Path:
    """An explain output folder; peaks and means in the tables are those of the maps inside the masks.

    `images` (case -> FLAIR array) are written as `<out>/../images/<case>_0000.nii.gz`, the run's input.
    """
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out.parent / "images"
    record = {"settings": {"method": METHOD}, "channels": list(channels), "images": str(images_dir),
              "ground_truth": "labels"}
    (out / "run.json").write_text(json.dumps(record))
    tables = []
    for case, instances in cases.items():
        shape = instances[0].mask.shape if instances else (8, 8, 8)
        labels = np.zeros(shape, np.uint16)
        rows = []
        for instance in instances:
            labels[instance.mask & (labels == 0)] = instance.instance_id
            row = {"case": case, "instance_id": instance.instance_id, "group": instance.group,
                   "voxels": int(instance.mask.sum()), "volume_mm3": float(instance.mask.sum() * np.prod(spacing))}
            for channel in channels:
                saliency = instance.maps[channel].astype(np.float32)
                save(saliency, out / case / METHOD / f"{instance.instance_id:03d}_{channel}.nii.gz", spacing)
                inside = saliency[instance.mask]
                row.update({f"{METHOD}_{channel}_peak_pos": inside.max(), f"{METHOD}_{channel}_peak_neg": inside.min(),
                            f"{METHOD}_{channel}_mean": inside.mean()})
            rows.append(row)
        save(labels, out / case / "instances.nii.gz", spacing)
        table = pd.DataFrame(rows)
        table.to_csv(out / case / "instances.csv", index=False)
        tables.append(table)
        if images and case in images:
            save(images[case].astype(np.float32), images_dir / f"{case}_0000.nii.gz", spacing)
    pd.concat(tables, ignore_index=True).to_csv(out / "instances.csv", index=False)
    return out


def ball(shape, centre, radius_mm, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    centre_mm = np.array(centre, float)[:, None, None, None] * np.array(spacing)[:, None, None, None]
    return ((grid - centre_mm) ** 2).sum(0) <= radius_mm ** 2


def fake_cohort(out: Path, n_cases: int = 3, seed: int = 0, shape=(28, 28, 20), spacing=(1.0, 1.0, 1.5)) -> Path:
    """A small cohort with FLAIR images, TP/FP/FN lesions and maps positive inside, negative just outside.

    FLAIR saliency is scaled per group (TP strongest, FN weakest), T1 saliency is a tenth of FLAIR's.
    """
    rng = np.random.default_rng(seed)
    scale = {"TP": 3.0, "FP": 1.5, "FN": 0.5}
    cases, images = {}, {}
    for c in range(n_cases):
        case = f"case_{c:03d}"
        flair = rng.normal(100, 10, shape)
        instances = []
        centres = [(7, 7, 6), (20, 8, 13), (8, 20, 13), (20, 20, 6)]
        groups = ["TP", "TP", "FP", "FN"] if c % 2 == 0 else ["TP", "FP", "FN", "TP"]
        for i, (centre, group) in enumerate(zip(centres, groups), start=1):
            radius = rng.uniform(2.0, 3.5)
            mask = ball(shape, centre, radius, spacing)
            flair[mask] += 60
            inner = ball(shape, centre, radius + 1.0, spacing)
            outer = ball(shape, centre, radius + 4.0, spacing) & ~inner
            strength = scale[group] * rng.uniform(0.8, 1.2)
            saliency = np.where(inner, strength, 0.0) - np.where(outer, 0.3 * strength, 0.0)
            saliency = saliency + rng.normal(0, 0.05, shape)
            instances.append(FakeInstance(i, group, mask, {"FLAIR": saliency, "T1": 0.1 * saliency}))
        cases[case], images[case] = instances, flair
    return write_output(out, cases, spacing, images=images)
