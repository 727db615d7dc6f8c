"""What the experiments share: nnU-Net's prediction (whole or near a region) and resumable per-case tables.

An experiment starts from a reopened `nnxai explain` output folder (OUT, `explain.reopen`): `OUT/run.json` names
the model, the input images, the ground truth and the settings (threshold, connectivity, ...), so the experiment
predicts exactly what the explained model predicts (`predict` goes through nnU-Net's own predictor, as
`nnxai explain` does, so the lesions an experiment finds are those of instances.csv). Its results go to
`OUT/experiments/`: one table per case in `OUT/experiments/<name>/` (written atomically; a re-run skips finished
cases, `explain.resumable`) and the cohort table `OUT/experiments/<name>.csv`.
"""
from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from nnxai.errors import InputError
from nnxai.explain.cohort import nnunet_prediction
from nnxai.explain.reopen import ReopenedRun
from nnxai.explain.resumable import CohortResult, concat_tables, run_resumable
from nnxai.explain.settings import ExplainSettings
from nnxai.files import write_atomically
from nnxai.lesions.instances import label_components, match_components
from nnxai.nnunet.geometry import preprocess_array, probabilities_in_original_space, to_network_space, to_original_space
from nnxai.nnunet.model import LoadedModel
from nnxai.nnunet.sliding_window import Slices, SlidingWindow, TileLayout

EXPERIMENTS_FOLDER = "experiments"
PARAMETERS_FILE = "parameters.json"


class ExperimentError(InputError):
    """An experiment that cannot start (bad OUT folder, bad option); the message names the file and the cause."""


@dataclass
class Prediction:
    """nnU-Net's prediction of one (possibly modified) case: its network input and the lesion probability."""

    data: torch.Tensor  # (C, *network shape), preprocessed
    properties: dict  # nnU-Net's properties of this preprocessing, to go back to the input's grid
    probability: np.ndarray  # lesion probability (*input shape)
    binary: np.ndarray  # probability > threshold


def preprocess_copy(model: LoadedModel, images: np.ndarray, properties: dict) -> tuple[torch.Tensor, dict]:
    """nnU-Net's preprocessing of read images (left unchanged), with its own copy of the properties."""
    properties = copy.deepcopy(properties)
    return torch.from_numpy(preprocess_array(model, images, properties)), properties


def predict(model: LoadedModel, window: SlidingWindow, images: np.ndarray, properties: dict,
            settings: ExplainSettings) -> Prediction:
    """Preprocess read images (left unchanged) and predict them exactly as `nnxai explain` does (nnU-Net's own
    predictor, on the window's device), so the lesions found are those of the explain run's instances.csv."""
    data, properties = preprocess_copy(model, images, properties)
    probability, binary = nnunet_prediction(model, data, properties, settings, window.device)
    return Prediction(data, properties, probability, binary)


def exact_region(layout: TileLayout, tiles: list[Slices]) -> np.ndarray:
    """Unpadded network voxels whose covering tiles are all in `tiles` (where `SlidingWindow.logits` of them is exact)."""
    covering, chosen = np.zeros(layout.padded_shape, np.int32), np.zeros(layout.padded_shape, np.int32)
    for tile in layout.tiles:
        covering[tile] += 1
        if tile in tiles:
            chosen[tile] += 1
    return (covering == chosen)[layout.unpad]


def exact_in_input_grid(model: LoadedModel, layout: TileLayout, tiles: list[Slices], properties: dict) -> np.ndarray:
    """Input voxels whose exported probability reads only exact network voxels: the exact region resampled back
    to the input grid the way nnU-Net resamples logits (linear, weights summing to 1) is 1 there."""
    exact = exact_region(layout, tiles).astype(np.float32)[None]
    return to_original_space(model, exact, properties)[0] > 1 - 1e-5


def tiles_for(model: LoadedModel, window: SlidingWindow, layout: TileLayout, region: np.ndarray,
              properties: dict) -> list[Slices]:
    """The fewest tiles around `region` (input grid) whose blended logits give its exact exported probabilities.

    Starts from the tiles touching the region's network-grid footprint (one input voxel wider) and widens the
    footprint until every voxel of the region is exact in the input grid (`exact_in_input_grid`).
    """
    footprint = to_network_space(model, ndimage.binary_dilation(region, np.ones((3, 3, 3))).astype(np.uint8),
                                 properties) > 0
    for margin in itertools.count(1):
        grown = window.pad(torch.from_numpy(ndimage.binary_dilation(footprint, iterations=margin))[None])[0].numpy()
        tiles = [tile for tile in layout.tiles if grown[tile].any()]
        if len(tiles) == len(layout.tiles) or exact_in_input_grid(model, layout, tiles, properties)[region].all():
            return tiles


@dataclass
class LocalPrediction:
    """nnU-Net's prediction near a region: exact probabilities where `exact`, prediction only there."""

    probability: np.ndarray  # lesion probability (*input shape); meaningful where `exact`
    binary: np.ndarray  # probability > threshold, inside `exact` only
    exact: np.ndarray  # input voxels whose probability equals the full prediction's
    tiles: list[Slices]  # the sliding-window tiles predicted


def predict_near(model: LoadedModel, window: SlidingWindow, data: torch.Tensor, properties: dict,
                 region: np.ndarray, settings: ExplainSettings, layout: TileLayout | None = None) -> LocalPrediction:
    """What the full float32 sliding-window prediction of preprocessed `data` says about `region`, from the tiles
    near it only (nnU-Net's own float16-accumulated prediction, `predict`, agrees with it to that rounding).

    Exact for the region's voxels and for every predicted component touching it: tiles are added until each
    such component, with its neighbours (the run's connectivity), lies where the prediction is exact, so its
    extent and size (min_size) are those of the full prediction. Far cheaper than a full prediction when the
    region is small: the other tiles are never run.
    """
    layout = layout or window.layout(data.shape[1:])
    neighbours = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[settings.connectivity])
    needed, cache = region, {}  # each round adds tiles; the ones predicted before are reused
    while True:
        tiles = tiles_for(model, window, layout, needed, properties)
        with torch.no_grad():
            logits = window.logits(data, tiles, layout, cache)
        probability = probabilities_in_original_space(model, logits, properties)[settings.lesion_label]
        exact = exact_in_input_grid(model, layout, tiles, properties) if len(tiles) < len(layout.tiles) \
            else np.ones(region.shape, dtype=bool)
        binary = (probability > settings.threshold) & exact
        components = label_components(binary, settings.connectivity)
        touching = np.isin(components, np.unique(components[region & binary]))
        reach = ndimage.binary_dilation(touching, neighbours)
        if exact[reach].all():
            return LocalPrediction(probability, binary, exact, tiles)
        needed = needed | reach


def matching_components(components: np.ndarray, lesion: np.ndarray,
                        settings: ExplainSettings) -> tuple[bool, np.ndarray]:
    """(detected, explained region) of a lesion given predicted component ids: with the run's matching rule,
    the matching component(s) when there are, else the lesion itself (as for a false negative)."""
    matching = match_components(components, lesion.astype(np.int32), settings.rule, settings.iou_threshold)
    if matching.fn_gt:
        return False, lesion
    return True, np.isin(components, matching.tp_pred)


def experiment_folder(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / EXPERIMENTS_FOLDER / name


def prepare_folder(out_dir: Path, name: str, parameters: Mapping, overwrite: bool) -> Path:
    """`OUT/experiments/<name>/` with its parameter record; refuses to mix results of other parameters."""
    folder = experiment_folder(out_dir, name)
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / PARAMETERS_FILE
    record = json.loads(json.dumps(parameters, default=str))
    if record_path.is_file() and not overwrite and json.loads(record_path.read_text()) != record:
        raise ExperimentError(f"{record_path}: the finished cases used other parameters; "
                              "repeat them, or use --overwrite to start again")
    if overwrite:
        for table in folder.glob("*.csv"):
            table.unlink()
    write_atomically(record_path, json.dumps(record, indent=2) + "\n")
    return folder


def run_cases(run: ReopenedRun, name: str, parameters: Mapping, cases: Sequence[str] | None,
              compute_case: Callable[[str, list[Path]], pd.DataFrame], overwrite: bool = False,
              progress: bool = True) -> tuple[pd.DataFrame, CohortResult]:
    """Run `compute_case` on every case (of the run's input folder, or those named) not finished yet, one atomic
    table per case in `OUT/experiments/<name>/`, then the cohort table `OUT/experiments/<name>.csv`."""
    files = run.case_files(cases)
    folder = prepare_folder(run.out_dir, name, parameters, overwrite)

    def compute(case: str) -> None:
        write_atomically(folder / f"{case}.csv", compute_case(case, files[case]).to_csv(index=False))

    result = run_resumable(files, lambda case: (folder / f"{case}.csv").is_file(), compute, name, progress)
    cohort = concat_tables(path for path in folder.glob("*.csv") if not path.name.startswith("."))
    write_atomically(folder.parent / f"{name}.csv", cohort.to_csv(index=False))
    return cohort, result
