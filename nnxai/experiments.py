"""What the experiments share: the explain run they start from, nnU-Net's prediction, resumable per-case tables.

An experiment reads an `nnxai explain` output folder (OUT): `OUT/run.json` names the model, the input images,
the ground truth and the settings (threshold, connectivity, ...), so the experiment predicts exactly what the
explained model predicts. Its results go to `OUT/experiments/`: one table per case in `OUT/experiments/<name>/`
(written atomically; a re-run skips finished cases) and the cohort table `OUT/experiments/<name>.csv`.
"""
from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnxai.explain import RUN_RECORD, CaseError, ExplainSettings, find_cases, write_atomically
from nnxai.explain_output import AnalysisInputError, load_explain_output
from nnxai.geometry import preprocess_array, probabilities_in_original_space
from nnxai.model import LoadedModel
from nnxai.sliding_window import SlidingWindow

EXPERIMENTS_FOLDER = "experiments"
PARAMETERS_FILE = "parameters.json"


class ExperimentError(click.ClickException):
    """An experiment that cannot start (bad OUT folder, bad option); the message names the file and the cause."""


@dataclass(frozen=True)
class ExplainRun:
    """What an explain output folder records: the model, its inputs and the settings of its prediction."""

    out_dir: Path
    model_dir: Path
    folds: list[str]
    checkpoint: str
    images_dir: Path
    gt_dir: Path | None
    settings: ExplainSettings


def read_explain_run(out_dir: Path) -> ExplainRun:
    """The run recorded in `out_dir/run.json` by `nnxai explain`."""
    try:
        record = load_explain_output(out_dir).record
    except AnalysisInputError as error:
        raise ExperimentError(str(error)) from None
    known = {f.name for f in fields(ExplainSettings)}
    try:
        settings = ExplainSettings(**{k: v for k, v in record["settings"].items() if k in known})
        model = record["model"]
        return ExplainRun(Path(out_dir), Path(model["folder"]), [str(f) for f in model["folds"]],
                          model["checkpoint"], Path(record["images"]),
                          Path(record["ground_truth"]) if record.get("ground_truth") else None, settings)
    except (KeyError, TypeError, AttributeError) as error:
        raise ExperimentError(f"{Path(out_dir) / RUN_RECORD}: not an nnxai explain run record ({error!r})") from None


def case_files(model: LoadedModel, images_dir: Path, only: list[str] | None = None) -> dict[str, list[Path]]:
    """The cases of an nnU-Net input folder (all, or the ones named in `only`), with their channel files."""
    try:
        cases = find_cases(images_dir, model.dataset_json["file_ending"], len(model.channel_names))
    except CaseError as error:
        raise ExperimentError(str(error)) from None
    if only:
        unknown = [case for case in only if case not in cases]
        if unknown:
            raise ExperimentError(f"{images_dir}: no case named {', '.join(unknown)}")
        cases = {case: cases[case] for case in only}
    if not cases:
        raise ExperimentError(f"{images_dir}: no input images (CASE_0000{model.dataset_json['file_ending']})")
    return cases


def channel_index(channel_names: list[str], role: str) -> int | None:
    """Index of the input channel playing `role` ("FLAIR" or "T1"; T1 also matches MPRAGE), from dataset.json names."""
    aliases = {"FLAIR": ("flair",), "T1": ("t1", "mprage")}[role]
    for index, name in enumerate(channel_names):
        lowered = name.lower()
        if any(lowered.startswith(alias) for alias in aliases) and "t1c" not in lowered and "gd" not in lowered:
            return index
    return None


@dataclass
class Prediction:
    """nnU-Net's prediction of one (possibly modified) case: its network input and the lesion probability."""

    data: torch.Tensor  # (C, *network shape), preprocessed
    properties: dict  # nnU-Net's properties of this preprocessing, to go back to the input's grid
    probability: np.ndarray  # lesion probability (*input shape)
    binary: np.ndarray  # probability > threshold


def predict(model: LoadedModel, window: SlidingWindow, images: np.ndarray, properties: dict,
            settings: ExplainSettings) -> Prediction:
    """Preprocess read images (left unchanged) and predict them exactly as `nnxai explain` does."""
    properties = copy.deepcopy(properties)
    data = torch.from_numpy(preprocess_array(model, images, properties))
    with torch.no_grad():
        logits = window.logits(data)
    probability = probabilities_in_original_space(model, logits, properties)[settings.lesion_label]
    return Prediction(data, properties, probability, probability > settings.threshold)


@dataclass
class ExperimentOutcome:
    """Cases computed now, skipped because finished earlier, and failed (case -> one-line reason)."""

    done: list[str]
    skipped: list[str]
    failed: dict[str, str]


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


def run_cases(out_dir: Path, name: str, parameters: Mapping, cases: Mapping[str, list[Path]],
              compute_case: Callable[[str, list[Path]], pd.DataFrame], overwrite: bool = False,
              progress: bool = True) -> tuple[pd.DataFrame, ExperimentOutcome]:
    """Run `compute_case` on every case not finished yet, one atomic table per case, then the cohort table.

    A case that raises CaseError fails alone (reported, no table); the others go on.
    """
    folder = prepare_folder(out_dir, name, parameters, overwrite)
    outcome = ExperimentOutcome([], [], {})
    for case, files in tqdm(cases.items(), desc=name, unit="case", disable=not progress):
        table_path = folder / f"{case}.csv"
        if table_path.is_file():
            outcome.skipped.append(case)
            continue
        try:
            table = compute_case(case, files)
        except CaseError as error:
            outcome.failed[case] = str(error)
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        write_atomically(table_path, table.to_csv(index=False))
        outcome.done.append(case)
    cohort = collect_case_tables(folder)
    write_atomically(folder.parent / f"{name}.csv", cohort.to_csv(index=False))
    return cohort, outcome


def collect_case_tables(folder: Path) -> pd.DataFrame:
    """Every finished case table of an experiment folder, concatenated (columns kept when all are empty)."""
    tables = [pd.read_csv(path, dtype={"case": str}) for path in sorted(folder.glob("*.csv"))
              if not path.name.startswith(".")]
    non_empty = [table for table in tables if not table.empty]
    if non_empty:
        return pd.concat(non_empty, ignore_index=True)
    return tables[0] if tables else pd.DataFrame()
