"""Synthetic lesions for any volume and spacing: a lesion-shaped blob and the SPEC 5.2 (MS-MIST) contrast recipe.

Used by the synthetic-lesion experiment on real scans and by the phantom cohort (`dataset_conversion.phantom`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def as_spacing(spacing: float | Sequence[float]) -> np.ndarray:
    """A spacing given as one number or three, as three floats."""
    return np.broadcast_to(np.asarray(spacing, dtype=float), (3,)).copy()


def random_rotation(rng: np.random.Generator, max_degrees: float | None = None) -> np.ndarray:
    """A rotation matrix: uniform over all rotations, or small Euler angles up to `max_degrees`."""
    if max_degrees is None:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        return q if np.linalg.det(q) > 0 else -q
    rotation = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))):
        a, b = [i for i in range(3) if i != axis]
        step = np.eye(3)
        step[a, a] = step[b, b] = np.cos(angle)
        step[a, b], step[b, a] = -np.sin(angle), np.sin(angle)
        rotation = step @ rotation
    return rotation


def lesion_blob(shape: Sequence[int], center: Sequence[float], radius_mm: float,
                spacing: float | Sequence[float], rng: np.random.Generator, irregularity: float = 0.25) -> np.ndarray:
    """Boolean mask of one lesion-like blob: a randomly oriented ellipsoid with the volume of a sphere of
    `radius_mm`, its surface perturbed by smooth noise. `center` is in voxel coordinates (may be fractional);
    the voxel nearest the centre is always included."""
    box, local = lesion_blob_box(shape, center, radius_mm, spacing, rng, irregularity)
    mask = np.zeros(tuple(shape), dtype=bool)
    mask[box] = local
    return mask


def lesion_blob_box(shape: Sequence[int], center: Sequence[float], radius_mm: float,
                     spacing: float | Sequence[float], rng: np.random.Generator,
                     irregularity: float = 0.25) -> tuple[tuple[slice, ...], np.ndarray]:
    """`lesion_blob` restricted to its bounding box (with one free voxel around it): (box, local mask)."""
    spacing, center, shape = as_spacing(spacing), np.asarray(center, dtype=float), np.asarray(shape)
    nearest = np.round(center).astype(int)
    if np.any(nearest < 0) or np.any(nearest >= shape):
        raise ValueError(f"lesion centre {tuple(center)} lies outside the volume of shape {tuple(shape)}")
    ratios = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.45, 1.0)])
    # E[(1 + a n)^3] = 1 + 3 a^2 for standard normal n: shrink so the expected volume stays that of the sphere
    semi_axes = radius_mm * ratios / np.cbrt(ratios.prod() * (1 + 3 * irregularity**2))
    rotation = random_rotation(rng)
    reach = semi_axes.max() * (1 + 2 * irregularity) / spacing + 1
    low = np.maximum(np.floor(center - reach).astype(int), 0)
    high = np.minimum(np.ceil(center + reach).astype(int) + 1, shape)
    box_shape = tuple(high - low)
    offsets_mm = (np.indices(box_shape).reshape(3, -1) + (low - center)[:, None]) * spacing[:, None]
    body = (rotation.T @ offsets_mm) / semi_axes[:, None]
    distance = np.sqrt((body**2).sum(0)).reshape(box_shape)
    noise = ndimage.gaussian_filter(rng.standard_normal(box_shape), np.maximum(semi_axes.mean() / 2 / spacing, 1))
    noise = np.clip(noise / max(noise.std(), 1e-12), -2, 2)
    local = distance < 1 + irregularity * noise
    local[tuple(nearest - low)] = True
    return tuple(slice(a, b) for a, b in zip(low, high)), local


def apply_lesion_contrast(image: np.ndarray, lesion: np.ndarray, mean_factor: float, factor_sd: float,
                          spacing: float | Sequence[float], rng: np.random.Generator,
                          field_smoothing_mm: float = 0.5, border_smoothing_mm: float = 1.0) -> None:
    """Multiply `image` (float, in place) inside `lesion` following the SPEC 5.2 recipe (MS-MIST): voxelwise
    factors ~ N(mean_factor, factor_sd) smoothed by `field_smoothing_mm`, blended in through the lesion
    mask smoothed by `border_smoothing_mm` (so the border fades over about a millimetre)."""
    spacing = as_spacing(spacing)
    found = ndimage.find_objects(lesion.astype(np.uint8))
    if not found:
        return
    pad = np.ceil(4 * border_smoothing_mm / spacing).astype(int) + 1
    box = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(found[0], pad, lesion.shape))
    inside = lesion[box].astype(np.float32)
    factors = mean_factor + factor_sd * rng.standard_normal(inside.shape, dtype=np.float32)
    factors = ndimage.gaussian_filter(factors, field_smoothing_mm / spacing)
    weight = ndimage.gaussian_filter(inside, border_smoothing_mm / spacing)
    image[box] *= 1 + weight * (factors - 1)
