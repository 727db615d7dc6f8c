"""An explained cohort on the tiny trained model, as the experiments find it: OUT/run.json and its inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnxai.explain.cohort import explain_cohort
from nnxai.explain.settings import ExplainSettings
from nnxai.nnunet.model import LoadedModel, load_model
from tests.fake_model import write_case, write_model_folder

# no mirroring and one SmoothGrad sample: eight times fewer forward passes, same semantics
SETTINGS = ExplainSettings(samples=1, use_mirroring=False)
SIZE = (48, 28, 16)  # long enough in x that a lesion does not touch every sliding-window tile


def write_scanner_like_case(images_dir: Path, case: str, seed: int, labels_dir: Path,
                            offset: float = 10.0) -> np.ndarray:
    """The fake case (two bright FLAIR blobs) on positive intensities, as scanners store them, so that
    multiplying intensities (the synthetic-lesion recipe) changes contrast; returns the GT array."""
    gt = write_case(images_dir, case, seed, size=SIZE, labels_dir=labels_dir)
    for channel in range(2):
        path = str(images_dir / f"{case}_{channel:04d}.nii.gz")
        image = sitk.ReadImage(path)
        shifted = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + np.float32(offset))
        shifted.CopyInformation(image)
        sitk.WriteImage(shifted, path)
    return gt


def write_like(reference: Path, array: np.ndarray, path: Path) -> None:
    """Write `array` (SimpleITK order) with the spacing, origin and direction of the image at `reference`."""
    image, source = sitk.GetImageFromArray(array), sitk.ReadImage(str(reference))
    image.SetSpacing(source.GetSpacing())
    image.SetOrigin(source.GetOrigin())
    image.SetDirection(source.GetDirection())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def explained_cohort(root: Path, cases: int = 1) -> tuple[LoadedModel, Path]:
    """Model, images, labels and an explain output folder under `root`; returns the model and OUT."""
    model_dir = write_model_folder(root / "model")
    for index in range(cases):
        write_scanner_like_case(root / "images", f"case_{index}", index, root / "labels")
    model = load_model(model_dir)
    result = explain_cohort(model, root / "images", root / "out", SETTINGS, root / "labels", progress=False)
    assert not result.failed
    return model, root / "out"
