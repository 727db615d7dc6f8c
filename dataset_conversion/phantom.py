"""Phantom MS cohort: two-channel brains (FLAIR-like, MPRAGE-like) with white-matter lesions and their masks.

Built from the 1 mm MNI152 2009a T1 template and its grey/white-matter probability maps that ship inside
nilearn's wheel (SPEC section 8), so realistic data exists without any download. Every subject gets its
own smooth deformation, bias fields, Rician noise and 0-30 lesions of known position; everything is
drawn from one seed, so the same seed writes the same bytes.

Lesions are drawn with `nnxai.lesions.synthesis`, which also inserts synthetic lesions into real scans
(SPEC section 5.2).
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import click
import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from dataset_conversion.nnunet_raw import (ConversionError, dataset_folder_name, patient_split, staged_dataset,
                                           write_case, write_dataset_json)
from nnxai.lesions.synthesis import apply_lesion_contrast, as_spacing, lesion_blob_box, random_rotation

TEMPLATE_KINDS = ("t1", "gm", "wm")
GRID_MARGIN_MM = 8.0

# FLAIR-like mean intensity of each tissue class: CSF nearly black, WM darker than GM.
FLAIR_TISSUE_MEANS = {"csf": 0.10, "gm": 0.80, "wm": 0.60}
INTENSITY_SCALE = 1000.0  # images are stored as int16 on a scanner-like range
NOISE_SD = 0.02  # Rician noise, relative to the 0..1 intensity range
BIAS_SD = 0.10  # sd of the log bias field
BIAS_CORRELATION_MM = 70.0
TEXTURE_SD = 0.04
TEXTURE_CORRELATION_MM = 6.0

MAX_ROTATION_DEG = 5.0
SCALE_RANGE = (0.94, 1.04)
MAX_TRANSLATION_MM = 2.0
DISPLACEMENT_SD_MM = 2.0
DISPLACEMENT_CORRELATION_MM = 30.0

MAX_LESIONS = 30
NO_LESION_PROBABILITY = 0.1
LESION_COUNT_GAMMA = (4.0, 4.0)  # shape, scale: 16 +- 8 lesions
LESION_VOLUME_MM3 = (10.0, 1000.0)
MIN_LESION_VOXELS = 3
PERIVENTRICULAR_PROBABILITY = 0.35
PERIVENTRICULAR_DISTANCE_MM = 5.0
VENTRICLE_MIN_DEPTH_MM = 20.0  # CSF this deep inside the brain is ventricular, not sulcal
LESION_MIN_WORLD_Z_MM = -10.0  # cerebral white matter only, above the cerebellum
DEEP_WM_PROBABILITY = 0.85
LESION_WM_PROBABILITY = 0.5
FLAIR_LESION_FACTOR = (1.4, 1.9)  # per-lesion mean factor, uniform in this range
T1_LESION_FACTOR = (0.6, 0.85)
LESION_FACTOR_SD = 0.07  # voxelwise sd of the factor field, as in the SPEC 5.2 recipe


def template_path(kind: str) -> Path:
    """Path of one MNI152 2009a map inside the installed nilearn package (no import, no download)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("nilearn is not installed: it ships the MNI152 template the phantom is built from")
    folder = Path(next(iter(spec.submodule_search_locations)), "datasets", "data")
    return folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class Template:
    """Template maps (t1, gm, wm, brain) on a cropped 1 mm grid, smoothed for sampling at `spacing`,
    and the output grid (shape, affine) on which every subject of that spacing is written."""

    spacing: float
    maps: dict[str, np.ndarray]
    map_origin: np.ndarray  # world position (mm) of voxel (0, 0, 0) of the maps
    brain_center: np.ndarray  # world position (mm)
    shape: tuple[int, int, int]
    affine: np.ndarray

    def world_coordinates(self) -> np.ndarray:
        """World position (mm) of every output voxel, shape (3, *shape)."""
        index = np.indices(self.shape, dtype=np.float32)
        return self.affine[:3, 3, None, None, None].astype(np.float32) + index * np.float32(self.spacing)


@lru_cache(maxsize=4)
def load_template(spacing: float) -> Template:
    """Read nilearn's template maps, crop them to the brain and build the output grid for `spacing` mm."""
    images = {kind: nib.load(template_path(kind)) for kind in TEMPLATE_KINDS}
    affine = images["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ConversionError(f"{template_path('t1')}: expected a 1 mm axis-aligned template")
    maps = {kind: np.asarray(image.dataobj, dtype=np.float32) / 255.0 for kind, image in images.items()}
    maps["brain"] = (maps["t1"] > 0).astype(np.float32)  # the T1 template nilearn ships is skull-stripped

    brain_voxels = np.argwhere(maps["brain"] > 0)
    low, high = brain_voxels.min(0), brain_voxels.max(0)
    crop = tuple(slice(max(a - 2, 0), b + 3) for a, b in zip(low, high))
    sigma = np.sqrt(max(spacing**2 - 1.0, 0.0)) / 2.355  # anti-aliasing from 1 mm to `spacing`
    maps = {kind: ndimage.gaussian_filter(m[crop], sigma) for kind, m in maps.items()}
    map_origin = affine[:3, 3] + np.array([s.start for s in crop], dtype=float)

    # Output grid: the brain's box plus a margin, within the template's field of view (which cuts the brainstem).
    field_low, field_high = affine[:3, 3], affine[:3, 3] + np.array(images["t1"].shape) - 1
    world_low = np.maximum(affine[:3, 3] + low - GRID_MARGIN_MM, field_low)
    world_high = np.minimum(affine[:3, 3] + high + GRID_MARGIN_MM, field_high)
    shape = tuple(int(n) + 1 for n in np.floor((world_high - world_low) / spacing))
    origin = (world_low + world_high) / 2 - (np.array(shape) - 1) / 2 * spacing
    grid_affine = np.diag([spacing, spacing, spacing, 1.0])
    grid_affine[:3, 3] = origin
    return Template(spacing, maps, map_origin, affine[:3, 3] + (low + high) / 2, shape, grid_affine)


def _cubic_upsampling_matrix(fine: int, coarse: int) -> np.ndarray:
    """(fine, coarse) matrix that interpolates `coarse` control values to `fine` points with cubic splines."""
    return ndimage.zoom(np.eye(coarse), (fine / coarse, 1), order=3, mode="nearest")


def smooth_random_field(shape: Sequence[int], spacing: float | Sequence[float], correlation_mm: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-sd random field varying over about `correlation_mm`: Gaussian noise on a coarse
    control grid, cubic-spline interpolated axis by axis (cheap even for 1 mm volumes)."""
    extent = np.asarray(shape) * as_spacing(spacing)
    coarse_shape = np.maximum(np.ceil(extent / correlation_mm).astype(int) + 1, 2)
    field = rng.standard_normal(tuple(coarse_shape))
    for axis, (fine, coarse) in enumerate(zip(shape, coarse_shape)):
        field = np.moveaxis(np.tensordot(_cubic_upsampling_matrix(fine, coarse), field, axes=(1, axis)), 0, axis)
    field -= field.mean()
    return (field / field.std()).astype(np.float32)


def _template_sampling_coordinates(template: Template, rng: np.random.Generator) -> np.ndarray:
    """Template-map voxel coordinates to sample for each output voxel of one subject: a random small
    rotation, anisotropic scaling and shift about the brain centre, plus a smooth random displacement."""
    linear = random_rotation(rng, MAX_ROTATION_DEG) @ np.diag(rng.uniform(*SCALE_RANGE, 3))
    shift = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    world = template.world_coordinates()
    center = template.brain_center.astype(np.float32)[:, None, None, None]
    source = np.einsum("ij,j...->i...", linear.astype(np.float32), world - center) + center
    for axis in range(3):
        displacement = smooth_random_field(template.shape, template.spacing, DISPLACEMENT_CORRELATION_MM, rng)
        source[axis] += np.float32(shift[axis]) + DISPLACEMENT_SD_MM * displacement - template.map_origin[axis]
    return source


@dataclass(frozen=True)
class LesionRecord:
    """One placed lesion: its id in the subject's lesion label map and how it was drawn."""

    lesion_id: int
    center_voxel: tuple[int, int, int]
    volume_mm3: float  # volume of the mask (voxels x voxel volume)
    voxels: int
    periventricular: bool
    flair_factor: float
    t1_factor: float


@dataclass(frozen=True)
class PhantomSubject:
    """One synthetic subject on its template grid: stored images (int16), lesion ids and tissue maps."""

    flair: np.ndarray
    t1: np.ndarray
    lesion_ids: np.ndarray  # int16: 0 background, i = lesion i (LesionRecord.lesion_id)
    white_matter: np.ndarray  # WM probability before lesions were drawn
    brain: np.ndarray  # bool
    affine: np.ndarray
    lesions: tuple[LesionRecord, ...]

    def images(self) -> list[nib.Nifti1Image]:
        """FLAIR (channel 0) and T1 (channel 1) as NIfTI images."""
        return [_nifti(self.flair, self.affine), _nifti(self.t1, self.affine)]

    def label_image(self) -> nib.Nifti1Image:
        """Binary lesion mask (label 1) as a NIfTI image."""
        return _nifti((self.lesion_ids > 0).astype(np.uint8), self.affine)


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _draw_lesion_count(rng: np.random.Generator) -> int:
    if rng.random() < NO_LESION_PROBABILITY:
        return 0
    return int(np.clip(round(rng.gamma(*LESION_COUNT_GAMMA)), 1, MAX_LESIONS))


def _draw_lesion_radius(rng: np.random.Generator, voxel_volume: float) -> float:
    """Radius (mm) of a sphere whose volume is drawn between a few voxels and LESION_VOLUME_MM3[1],
    log-uniform skewed towards small lesions (as in MS)."""
    smallest = max(LESION_VOLUME_MM3[0], (MIN_LESION_VOXELS + 1) * voxel_volume)
    volume = smallest * (LESION_VOLUME_MM3[1] / smallest) ** (rng.random() ** 2)
    return float(np.cbrt(3 * volume / (4 * np.pi)))


def find_ventricles(csf: np.ndarray, brain: np.ndarray, spacing: float | Sequence[float]) -> np.ndarray:
    """Ventricular CSF: CSF lying deeper than VENTRICLE_MIN_DEPTH_MM inside the brain (sulcal CSF is shallow)."""
    depth = ndimage.distance_transform_edt(brain, sampling=as_spacing(spacing))
    return (csf > 0.5) & (depth > VENTRICLE_MIN_DEPTH_MM)


def place_lesions(white_matter: np.ndarray, ventricles: np.ndarray, world_z: np.ndarray,
                  spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, bool]]]:
    """Draw 0-MAX_LESIONS separate lesions in cerebral white matter, some next to the ventricles.

    Returns an int16 map of lesion ids (1..n; lesions never touch, even diagonally) and, per lesion,
    (flat index of its centre voxel, periventricular?)."""
    shape = white_matter.shape
    cerebral = world_z[None, None, :] > LESION_MIN_WORLD_Z_MM
    to_ventricle = ndimage.distance_transform_edt(~ventricles, sampling=as_spacing(spacing))
    centres = {
        False: np.flatnonzero((white_matter > DEEP_WM_PROBABILITY) & cerebral),
        True: np.flatnonzero((white_matter > 0.6) & cerebral & (to_ventricle <= PERIVENTRICULAR_DISTANCE_MM)
                             & ~ventricles),
    }
    allowed = (white_matter > LESION_WM_PROBABILITY) & ~ventricles
    lesion_ids = np.zeros(shape, dtype=np.int16)
    placed: list[tuple[int, bool]] = []
    count = _draw_lesion_count(rng)
    touching = np.ones((3, 3, 3), dtype=bool)
    for _ in range(20 * count):
        if len(placed) == count:
            break
        periventricular = bool(rng.random() < PERIVENTRICULAR_PROBABILITY and centres[True].size)
        if not centres[periventricular].size:
            break
        flat = int(centres[periventricular][rng.integers(centres[periventricular].size)])
        voxel = np.array(np.unravel_index(flat, shape))
        radius = _draw_lesion_radius(rng, spacing**3)
        box, blob = lesion_blob_box(shape, voxel + rng.uniform(-0.5, 0.5, 3), radius, spacing, rng)
        components, _ = ndimage.label(blob & allowed[box], structure=touching)
        own = components == components[tuple(voxel - [s.start for s in box])]
        if own.sum() < MIN_LESION_VOXELS or lesion_ids[box][ndimage.binary_dilation(own, touching)].any():
            continue
        lesion_ids[box][own] = len(placed) + 1
        placed.append((flat, periventricular))
    return lesion_ids, placed


def _noisy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rician noise: magnitude of the image plus complex Gaussian noise."""
    real = image + NOISE_SD * rng.standard_normal(image.shape, dtype=np.float32)
    return np.hypot(real, NOISE_SD * rng.standard_normal(image.shape, dtype=np.float32))


def synthesize_subject(template: Template, rng: np.random.Generator) -> PhantomSubject:
    """One phantom subject: deformed anatomy, FLAIR-like and MPRAGE-like contrast, lesions, bias and noise."""
    spacing = template.spacing
    coordinates = _template_sampling_coordinates(template, rng)
    tissue = {kind: ndimage.map_coordinates(m, coordinates, order=1, output=np.float32)
              for kind, m in template.maps.items()}
    brain = tissue["brain"] > 0.5
    gm, wm = (np.where(brain, np.clip(tissue[k], 0, 1), 0).astype(np.float32) for k in ("gm", "wm"))
    csf = np.clip(1 - gm - wm, 0, 1) * brain
    texture = 1 + TEXTURE_SD * smooth_random_field(template.shape, spacing, TEXTURE_CORRELATION_MM, rng)
    flair = (FLAIR_TISSUE_MEANS["csf"] * csf + FLAIR_TISSUE_MEANS["gm"] * gm + FLAIR_TISSUE_MEANS["wm"] * wm) * texture
    t1 = tissue["t1"]

    world_z = template.affine[2, 3] + spacing * np.arange(template.shape[2])
    lesion_ids, placed = place_lesions(wm, find_ventricles(csf, brain, spacing), world_z, spacing, rng)
    records = []
    for (lesion_id, box), (flat, periventricular) in zip(enumerate(ndimage.find_objects(lesion_ids), 1), placed):
        lesion = lesion_ids[box] == lesion_id
        factors = {"flair": rng.uniform(*FLAIR_LESION_FACTOR), "t1": rng.uniform(*T1_LESION_FACTOR)}
        for image, factor in ((flair, factors["flair"]), (t1, factors["t1"])):
            apply_lesion_contrast(image[box], lesion, factor, LESION_FACTOR_SD, spacing, rng)
        voxels = int(lesion.sum())
        records.append(LesionRecord(lesion_id, tuple(int(i) for i in np.unravel_index(flat, template.shape)),
                                    voxels * spacing**3, voxels, periventricular, factors["flair"], factors["t1"]))

    stored = []
    for image in (flair, t1):
        biased = image * np.exp(BIAS_SD * smooth_random_field(template.shape, spacing, BIAS_CORRELATION_MM, rng))
        stored.append(np.where(brain, np.round(_noisy(biased, rng) * INTENSITY_SCALE), 0).astype(np.int16))
    return PhantomSubject(stored[0], stored[1], lesion_ids, wm, brain, template.affine.copy(), tuple(records))


SPACING_RANGE_MM = (1.0, 4.0)
LESION_TABLE = "phantom_lesions.csv"


def make_phantom_cohort(out_root: Path, cases: int = 12, seed: int = 0, spacing: float = 2.0,
                        dataset_id: int = 901, name: str = "MSPhantom", test_fraction: float = 0.25,
                        progress: bool = False) -> Path:
    """Write `out_root`/DatasetNNN_Name: an nnU-Net raw dataset of `cases` phantom subjects (FLAIR = channel 0,
    T1 = channel 1, label 1 = lesion), test cases in imagesTs/labelsTs, and a table of every lesion drawn.

    Subject i depends only on (seed, i), so a larger cohort extends a smaller one. Returns the dataset folder.
    """
    if cases < 1:
        raise ConversionError(f"--cases {cases}: need at least one case")
    if not SPACING_RANGE_MM[0] <= spacing <= SPACING_RANGE_MM[1]:
        raise ConversionError(f"--spacing {spacing}: must be between {SPACING_RANGE_MM[0]} and {SPACING_RANGE_MM[1]} mm")
    case_ids = [f"phantom_{index:03d}" for index in range(cases)]
    try:
        test_ids = set(patient_split({c: c for c in case_ids}, 0.0, test_fraction, seed)["test"])
    except ValueError as error:
        raise ConversionError(f"--test-fraction {test_fraction}: {error}") from error
    target = Path(out_root) / dataset_folder_name(dataset_id, name)
    template = load_template(float(spacing))
    rows = []
    with staged_dataset(target) as staging:
        for index, case_id in enumerate(tqdm(case_ids, desc="phantom", unit="case", disable=not progress)):
            subject = synthesize_subject(template, np.random.default_rng([seed, index]))
            test = case_id in test_ids
            write_case(staging, case_id, subject.images(), subject.label_image(), test=test)
            rows += [{"case_id": case_id, "split": "test" if test else "train", **asdict(lesion)}
                     for lesion in subject.lesions]
        columns = ["case_id", "split", *LesionRecord.__dataclass_fields__]
        pd.DataFrame(rows, columns=columns).to_csv(staging / LESION_TABLE, index=False, float_format="%.4f")
        write_dataset_json(staging, cases - len(test_ids), name,
                           description="Synthetic MS lesion phantom (nnxai) built from nilearn's MNI152 2009a template",
                           reference="MNI ICBM152 2009a nonlinear symmetric template (shipped with nilearn)",
                           license="synthetic data derived from the MNI ICBM152 template, see its copyright notice",
                           phantom={"seed": seed, "spacing_mm": float(spacing), "cases": cases,
                                    "test_cases": sorted(test_ids), "lesion_table": LESION_TABLE})
    return target


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=12, show_default=True, help="Number of subjects.")
@click.option("--seed", default=0, show_default=True, help="Random seed: the same seed writes the same files.")
@click.option("--spacing", default=2.0, show_default=True, type=float,
              help="Isotropic voxel size in mm (2 mm runs nnU-Net on a CPU in minutes; 1 mm is the template's).")
@click.option("--dataset-id", default=901, show_default=True, help="nnU-Net dataset id.")
@click.option("--name", default="MSPhantom", show_default=True, help="nnU-Net dataset name.")
@click.option("--test-fraction", default=0.25, show_default=True, help="Share of subjects put in imagesTs/labelsTs.")
def command(out: Path, cases: int, seed: int, spacing: float, dataset_id: int, name: str, test_fraction: float) -> None:
    """Write a synthetic two-channel MS lesion cohort (FLAIR, T1 + lesion masks) to OUT/DatasetNNN_NAME."""
    target = make_phantom_cohort(out, cases, seed, spacing, dataset_id, name, test_fraction, progress=True)
    click.echo(f"wrote {target}")
