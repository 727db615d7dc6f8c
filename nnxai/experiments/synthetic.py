"""Synthetic lesions (SPEC section 5.2): a dose-response experiment and the fourth group of lesions.

Per case, lesions of known size and contrast are inserted into normal-appearing white matter of a copy of the
scan (the files on disk are never changed), the copy is predicted as `nnxai explain` predicts, and each
synthetic lesion gets a row: detected or not, mean lesion probability inside it, and its instance SmoothGrad.

- White matter: a mask the user gives (`wm_dir/<case><ending>`, non-zero = white matter), or the brightest of
  three T1 intensity classes inside the brain (nnU-Net's non-zero mask, so skull-stripped inputs are assumed).
  Normal-appearing white matter leaves out every existing lesion (ground truth if known, and the model's own
  prediction of the unmodified scan) with `clearance_mm` around it.
- Recipe (MS-MIST, via `dataset_conversion.phantom`): a randomly oriented, irregular blob of the nominal volume
  (clipped to normal-appearing white matter), intensities multiplied inside it by a factor field of the swept
  mean and the recipe's voxelwise sd (FLAIR 0.068, T1 0.139), smoothed 0.5 mm, border blended over 1 mm.
- Design: every combination of size x FLAIR factor x T1 factor, `per_case` times per case. By default each
  lesion gets its own synthetic volume (one prediction each: its prediction cannot be influenced by another
  synthetic lesion). With `per_volume` > 1, that many lesions share a volume, their centres at least
  `min_distance_mm` apart: fewer predictions, at the price of a small influence of one lesion on another's
  prediction when both fall in one sliding-window tile (use a distance of at least a patch's extent to avoid it).
- Saliency as `nnxai explain` computes it, with the run's methods and settings (SmoothGrad sampling, noise,
  aggregation; Grad-CAM++ layer and variant): the same statistics columns as instances.csv.
- Detection follows the run's matching rule: the lesion counts as detected when a predicted component (after
  `min_size`) matches it (any overlap, or IoU). Its explained region is then the matching predicted
  component(s); when missed, the inserted mask itself (as for a false negative).
- Prediction: the modified volume is preprocessed and predicted whole by nnU-Net's own predictor, as `nnxai
  explain` would predict the saved volume (nnU-Net's normalization sees the lesion; near the threshold only
  nnU-Net's own float16 arithmetic gives its segmentation voxel for voxel).
"""
from __future__ import annotations

import itertools
import os
import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
from scipy import ndimage
from sklearn.cluster import KMeans
from tqdm import tqdm

from nnxai.attribution.engine import GradientEngine
from nnxai.experiments.common import ExperimentError, experiment_folder, matching_components, predict, run_cases
from nnxai.explain.cases import CaseError, check_channels, read_ground_truth
from nnxai.explain.cohort import LesionInstance, instance_maps, instance_network_masks, instance_row
from nnxai.explain.cohort import table_columns as instance_table_columns
from nnxai.explain.reopen import ReopenedRun
from nnxai.explain.resumable import CohortResult
from nnxai.explain.settings import ExplainSettings
from nnxai.lesions.instances import label_components
from nnxai.lesions.synthesis import apply_lesion_contrast, lesion_blob
from nnxai.nnunet.channels import channel_index
from nnxai.nnunet.geometry import read_images, write_volume
from nnxai.nnunet.model import LoadedModel
from nnxai.nnunet.sliding_window import SlidingWindow

EXPERIMENT = "synthetic"
GROUP = "synthetic"
VOLUMES_FOLDER = "synthetic_volumes"
RECIPE_FLAIR_SD = 0.068
RECIPE_T1_SD = 0.139


@dataclass(frozen=True)
class SyntheticDesign:
    """What is inserted where: the swept conditions, their replicates, and the placement rules."""

    sizes_mm3: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0)
    flair_factors: tuple[float, ...] = (1.1, 1.2, 1.323, 1.5)
    t1_factors: tuple[float, ...] = (0.791,)
    flair_sd: float = RECIPE_FLAIR_SD
    t1_sd: float = RECIPE_T1_SD
    per_case: int = 1
    per_volume: int = 1
    min_distance_mm: float = 40.0
    clearance_mm: float = 5.0
    margin_mm: float = 2.0
    seed: int = 0

    def __post_init__(self):
        for name in ("sizes_mm3", "flair_factors", "t1_factors"):
            values = getattr(self, name)
            if not values or any(v <= 0 for v in values):
                raise ExperimentError(f"{name}: need one or more positive values, got {list(values)}")
        if self.per_case < 1 or self.per_volume < 1:
            raise ExperimentError(f"per_case and per_volume must be >= 1, got {self.per_case}, {self.per_volume}")

    def lesions(self) -> list[PlannedLesion]:
        """Every lesion of one case, numbered from 1: each condition once per replicate."""
        conditions = itertools.product(range(self.per_case), self.sizes_mm3, self.flair_factors, self.t1_factors)
        return [PlannedLesion(i, size, flair, t1) for i, (_, size, flair, t1) in enumerate(conditions, start=1)]

    def volumes(self) -> list[list[PlannedLesion]]:
        """The lesions grouped into synthetic volumes of `per_volume` lesions."""
        lesions = self.lesions()
        return [lesions[i:i + self.per_volume] for i in range(0, len(lesions), self.per_volume)]


@dataclass(frozen=True)
class PlannedLesion:
    lesion_id: int
    size_mm3: float
    flair_factor: float
    t1_factor: float

    @property
    def radius_mm(self) -> float:
        return float(np.cbrt(3 * self.size_mm3 / (4 * np.pi)))


@dataclass
class PlacedLesion:
    planned: PlannedLesion
    mask: np.ndarray  # bool, input array shape
    volume_id: int


@dataclass
class Placement:
    """Lesions placed in one case, and the ones for which normal-appearing white matter had no room."""

    placed: list[PlacedLesion] = field(default_factory=list)
    unplaced: list[PlannedLesion] = field(default_factory=list)


def white_matter_from_t1(t1: np.ndarray, brain: np.ndarray, seed: int = 0, max_samples: int = 200_000) -> np.ndarray:
    """White matter as the brightest of three T1 intensity classes (CSF < GM < WM) inside `brain`.

    The classes come from 1-D k-means on (a random sample of) the brain's T1 intensities; a voxel is white
    matter when it is closer to the brightest class mean than to the middle one. A one-voxel opening removes
    isolated bright voxels.
    """
    values = t1[brain].astype(np.float64)
    if values.size < 3:
        return np.zeros(t1.shape, dtype=bool)
    rng = np.random.default_rng(seed)
    sample = values if values.size <= max_samples else rng.choice(values, max_samples, replace=False)
    kmeans = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(sample[:, None])
    middle, brightest = np.sort(kmeans.cluster_centers_.ravel())[1:]
    return ndimage.binary_opening(brain & (t1 > (middle + brightest) / 2))


def read_white_matter(model: LoadedModel, path: Path, shape: tuple[int, ...], spacing) -> np.ndarray:
    """A user's white-matter mask (non-zero = white matter), refused when it is not on the image's grid."""
    if not path.is_file():
        raise CaseError(f"{path}: white-matter mask missing")
    mask, properties = model.plans_manager.image_reader_writer_class().read_seg(os.fspath(path))
    mask = mask[0]
    if tuple(mask.shape) != tuple(shape):
        raise CaseError(f"{path}: shape {mask.shape[::-1]} differs from the image's {tuple(shape)[::-1]}")
    if not np.allclose(properties["spacing"], spacing, atol=1e-4):
        raise CaseError(f"{path}: spacing {properties['spacing']} differs from the image's {spacing}")
    return mask != 0


def normal_appearing(white_matter: np.ndarray, lesions: np.ndarray, spacing, clearance_mm: float) -> np.ndarray:
    """White matter farther than `clearance_mm` from every existing lesion voxel."""
    if not lesions.any():
        return white_matter.copy()
    return white_matter & (ndimage.distance_transform_edt(~lesions, sampling=spacing) > clearance_mm)


def place_lesions(nawm: np.ndarray, design: SyntheticDesign, spacing, rng: np.random.Generator,
                  connectivity: int = 18) -> Placement:
    """Draw every lesion of the design: centre at least `margin_mm` deep in normal-appearing white matter, and
    as deep as the lesion's radius where there is such room (so that clipping to white matter shrinks it
    little), `min_distance_mm` from the other lesions of its volume; blob clipped to that matter, one component."""
    spacing = np.asarray(spacing, dtype=float)
    depth = ndimage.distance_transform_edt(nawm, sampling=spacing)
    placement = Placement()
    for volume_id, lesions in enumerate(design.volumes(), start=1):
        deep = np.argwhere(depth >= max(design.margin_mm, max(lesion.radius_mm for lesion in lesions)))
        candidates = deep if len(deep) else np.argwhere(depth >= design.margin_mm)
        centres = _spread_centres(candidates, len(lesions), spacing, design.min_distance_mm, rng)
        free = nawm.copy()
        for lesion, centre in itertools.zip_longest(lesions, centres):
            if centre is None or not free[tuple(centre)]:
                placement.unplaced.append(lesion)
                continue
            blob = lesion_blob(nawm.shape, centre, lesion.radius_mm, spacing, rng) & free
            components = label_components(blob, connectivity)
            mask = components == components[tuple(centre)]
            free &= ~ndimage.binary_dilation(mask, np.ones((3, 3, 3), dtype=bool))
            placement.placed.append(PlacedLesion(lesion, mask, volume_id))
    return placement


def _spread_centres(candidates: np.ndarray, count: int, spacing: np.ndarray, min_distance_mm: float,
                    rng: np.random.Generator, attempts: int = 20) -> list[np.ndarray]:
    """Up to `count` random candidate voxels pairwise at least `min_distance_mm` apart: random sequential
    choice, repeated up to `attempts` times when an early choice leaves no room for the later ones."""
    best: list[np.ndarray] = []
    for _ in range(attempts):
        chosen, pool = [], candidates
        while len(chosen) < count and len(pool):
            centre = pool[rng.integers(len(pool))]
            chosen.append(centre)
            pool = pool[np.linalg.norm((pool - centre) * spacing, axis=1) >= min_distance_mm]
        if len(chosen) > len(best):
            best = chosen
        if len(best) == count:
            break
    return best


def insert_lesions(images: np.ndarray, lesions: list[PlacedLesion], flair_channel: int, t1_channel: int | None,
                   design: SyntheticDesign, spacing, rng: np.random.Generator) -> np.ndarray:
    """A float32 copy of the (C, *shape) images with the lesions' contrast applied (FLAIR and T1 channels)."""
    modified = images.astype(np.float32, copy=True)
    for lesion in lesions:
        apply_lesion_contrast(modified[flair_channel], lesion.mask, lesion.planned.flair_factor, design.flair_sd,
                              spacing, rng)
        if t1_channel is not None:
            apply_lesion_contrast(modified[t1_channel], lesion.mask, lesion.planned.t1_factor, design.t1_sd,
                                  spacing, rng)
    return modified


def synthetic_channels(channel_names: list[str], white_matter_given: bool) -> tuple[int, int | None]:
    """(FLAIR, T1 or None) channel indices; refuses models without FLAIR, and without T1 unless WM masks are given."""
    flair, t1 = channel_index(channel_names, "FLAIR"), channel_index(channel_names, "T1")
    if flair is None:
        raise ExperimentError(f"model channels {channel_names}: none is FLAIR, which synthetic lesions brighten")
    if t1 is None and not white_matter_given:
        raise ExperimentError(f"model channels {channel_names}: no T1 to find white matter in; give --wm-mask")
    return flair, t1


def table_columns(channel_names: list[str], methods: Sequence[str]) -> list[str]:
    """Columns of synthetic.csv, in order: the design and outcome, then the saliency columns of instances.csv."""
    columns = ["case", "lesion_id", "volume_id", "group", "size_mm3", "flair_factor", "t1_factor", "voxels",
               "volume_mm3", "detected", "mean_probability", "baseline_probability", "explained_region",
               "region_voxels", "network_voxels", "centroid_x", "centroid_y", "centroid_z"]
    instance_columns = instance_table_columns(channel_names, tuple(methods))
    return columns + instance_columns[len(instance_table_columns(channel_names, ())):]


def synthetic_case(model: LoadedModel, window: SlidingWindow, case: str, files: list[Path], settings: ExplainSettings,
                   design: SyntheticDesign, gt_file: Path | None = None, wm_file: Path | None = None,
                   volumes_dir: Path | None = None, progress: bool = False) -> pd.DataFrame:
    """Insert, predict and explain every synthetic lesion of one case; returns its rows (see module doc).

    With `volumes_dir`, each synthetic volume is written to `volumes_dir/<case>/` as nnU-Net input files
    (`<case>_synNNN_0000.nii.gz`, ...) with its lesion ids (`<case>_synNNN_lesions.nii.gz`).
    """
    check_channels(files)
    channels = model.channel_names
    flair_channel, t1_channel = synthetic_channels(channels, wm_file is not None)
    images, properties = read_images(model, files)
    spacing = np.asarray(properties["spacing"], dtype=float)
    if wm_file is not None:
        white_matter = read_white_matter(model, wm_file, images.shape[1:], properties["spacing"])
    else:
        white_matter = white_matter_from_t1(images[t1_channel], create_nonzero_mask(images), design.seed)
    ground_truth = None if gt_file is None else read_ground_truth(model, gt_file, files[0], settings.lesion_label)
    baseline = predict(model, window, images, properties, settings)
    existing = baseline.binary.copy() if ground_truth is None else baseline.binary | ground_truth
    rng = np.random.default_rng([design.seed, zlib.crc32(case.encode())])
    nawm = normal_appearing(white_matter, existing, spacing, design.clearance_mm)
    placement = place_lesions(nawm, design, spacing, rng, settings.connectivity)
    for lesion in placement.unplaced:
        tqdm.write(f"warning: {case}: no room for lesion {lesion.lesion_id} ({lesion.size_mm3:g} mm^3) in normal-"
                   "appearing white matter; left out", file=sys.stderr)

    staging = None if volumes_dir is None else volumes_dir / f".{case}.partial"
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    rows = []
    volume_ids = sorted({lesion.volume_id for lesion in placement.placed})
    for volume_id in tqdm(volume_ids, desc=case, unit="volume", disable=not progress, leave=False):
        lesions = [lesion for lesion in placement.placed if lesion.volume_id == volume_id]
        modified = insert_lesions(images, lesions, flair_channel, t1_channel, design, spacing, rng)
        prediction = predict(model, window, modified, properties, settings)
        data, volume_properties = prediction.data, prediction.properties
        components = label_components(prediction.binary, settings.connectivity, settings.min_size)
        regions = {lesion.planned.lesion_id: matching_components(components, lesion.mask, settings)
                   for lesion in lesions}
        instances = [LesionInstance(i, GROUP, region) for i, (_, region) in regions.items()]
        network_masks = instance_network_masks(model, instances, volume_properties)
        saliency = saliency_statistics(window, data, network_masks, channels, settings,
                                       f"{case}/{EXPERIMENT}/{volume_id}", progress)
        for lesion in lesions:
            lesion_id = lesion.planned.lesion_id
            detected, region = regions[lesion_id]
            row = instance_row(case, LesionInstance(lesion_id, GROUP, lesion.mask), prediction.probability,
                               volume_properties, network_masks[lesion_id])
            row.pop("instance_id")
            rows.append({**row, **saliency[lesion_id], "lesion_id": lesion_id, "volume_id": volume_id,
                         "size_mm3": lesion.planned.size_mm3,
                         "flair_factor": lesion.planned.flair_factor,
                         "t1_factor": lesion.planned.t1_factor if t1_channel is not None else np.nan,
                         "detected": detected,
                         "baseline_probability": float(baseline.probability[lesion.mask].mean()),
                         "explained_region": "prediction" if detected else "inserted",
                         "region_voxels": int(region.sum())})
        if staging is not None:
            _write_volume_files(staging, case, volume_id, modified, lesions, properties, channels)
    if staging is not None:
        final = volumes_dir / case
        shutil.rmtree(final, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
    return pd.DataFrame(rows, columns=table_columns(channels, settings.methods))


def saliency_statistics(window: SlidingWindow, data: torch.Tensor, network_masks: dict[int, np.ndarray],
                        channel_names: list[str], settings: ExplainSettings, stream: str,
                        progress: bool = False) -> dict[int, dict[str, float]]:
    """Per region, the saliency columns of instances.csv, computed as `nnxai explain` computes them: the run's
    methods (SmoothGrad with its sampling, noise and aggregation; Grad-CAM++ with its layer and variant), in
    network space. With `settings.samples` 0 no map is computed and the columns are NaN."""
    columns = table_columns(channel_names, settings.methods)[len(table_columns(channel_names, ())):]
    if settings.samples == 0:
        return {region: dict.fromkeys(columns, np.nan) for region in network_masks}
    statistics: dict[int, dict[str, float]] = {region: {} for region in network_masks}
    for _, region, _, values in instance_maps(window, data, network_masks, channel_names, settings, stream,
                                              GradientEngine(amp=settings.amp), progress):
        statistics[region].update(values)
    return statistics


def _write_volume_files(folder: Path, case: str, volume_id: int, images: np.ndarray, lesions: list[PlacedLesion],
                        properties: dict, channels: list[str]) -> None:
    stem = folder / f"{case}_syn{volume_id:03d}"
    for channel in range(len(channels)):
        write_volume(images[channel], Path(f"{stem}_{channel:04d}.nii.gz"), properties)
    ids = np.zeros(images.shape[1:], dtype=np.uint16)
    for lesion in lesions:
        ids[lesion.mask] = lesion.planned.lesion_id
    write_volume(ids, Path(f"{stem}_lesions.nii.gz"), properties)


def synthetic_experiment(run: ReopenedRun, design: SyntheticDesign, wm_dir: Path | None = None,
                         save_volumes: bool = False, device: str = "cpu", overwrite: bool = False,
                         progress: bool = True,
                         cases: Sequence[str] | None = None) -> tuple[pd.DataFrame, CohortResult]:
    """The synthetic-lesion experiment on every case (or those named); writes `OUT/experiments/synthetic.csv`
    (resumable)."""
    model, settings = run.model, run.settings
    synthetic_channels(model.channel_names, wm_dir is not None)
    window = run.window(device)
    ending = model.dataset_json["file_ending"]
    volumes_dir = experiment_folder(run.out_dir, VOLUMES_FOLDER) if save_volumes else None
    parameters = {"design": asdict(design), "settings": asdict(settings), "model": model.describe(),
                  "ground_truth": run.gt_dir, "white_matter": wm_dir or "T1 intensity classes"}

    def compute(case: str, files: list[Path]) -> pd.DataFrame:
        return synthetic_case(model, window, case, files, settings, design, run.gt_file(case),
                              None if wm_dir is None else Path(wm_dir) / f"{case}{ending}", volumes_dir, progress)

    return run_cases(run, EXPERIMENT, parameters, cases, compute, overwrite, progress)
