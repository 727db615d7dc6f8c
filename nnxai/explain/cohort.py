"""`nnxai explain`: per case, nnU-Net's prediction, its lesion instances and one saliency map per instance.

Each case is written to `OUT/<case>/` through a temporary folder that is renamed when complete, so an
interrupted run never leaves half a case and a re-run continues with the cases still missing.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from nnxai.attribution.base import Attribution
from nnxai.attribution.engine import AMP_DTYPES, GradientEngine, GradientError
from nnxai.attribution.gradcampp import VARIANTS, LayerError, check_layer, default_layer
from nnxai.attribution.smoothgrad import AGGREGATIONS
from nnxai.errors import InputError
from nnxai.explain.cases import CaseError, check_channels, find_cases, read_ground_truth, shard
from nnxai.explain.output import CASE_TABLE, RUN_RECORD, map_file_name, method_channels, peak_column
from nnxai.explain.resumable import CohortResult, concat_tables, run_resumable
from nnxai.explain.settings import ATTRIBUTIONS, METHODS, ComputeOptions, ExplainSettings
from nnxai.explain.uncertainty import UNCERTAINTY_COLUMNS, fold_probabilities, instance_uncertainty
from nnxai.files import write_atomically
from nnxai.lesions.instances import LesionInstance, case_instances
from nnxai.nnunet.channels import channel_index
from nnxai.nnunet.geometry import (preprocess_array, probabilities_in_original_space, read_images, to_network_space,
                                   to_original_space, voxel_volume_mm3, world_coordinates, write_volume)
from nnxai.nnunet.model import LoadedModel
from nnxai.nnunet.sliding_window import SlidingWindow


def nnunet_prediction(model: LoadedModel, data: torch.Tensor, properties: dict, settings: ExplainSettings,
                      device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(lesion probability, segmentation) in the input grid from nnU-Net's own predictor, as `nnxai explain`
    exports them; the experiments predict through this too, so they find exactly the explained lesions."""
    logits = model.nnunet_logits(data, settings.step_size, settings.use_mirroring, device)
    probabilities = probabilities_in_original_space(model, logits, properties)
    return (probabilities[settings.lesion_label],
            model.segment(probabilities, settings.lesion_label, settings.threshold))


def instance_network_masks(model: LoadedModel, instances: list[LesionInstance],
                           properties: dict) -> dict[int, np.ndarray]:
    """Each instance's mask in network space, mapped together in as few label volumes as overlaps allow.

    Predicted instances never overlap each other, nor FN lesions each other; with the IoU rule an FN
    lesion may overlap a predicted instance, and then goes into a second volume.
    """
    layers: list[tuple[np.ndarray, list[LesionInstance]]] = []
    for instance in instances:
        layer = next((layer for layer in layers if not layer[0][instance.mask].any()), None)
        if layer is None:
            layers.append(layer := (np.zeros(instance.mask.shape, dtype=np.int32), []))
        layer[0][instance.mask] = instance.instance_id
        layer[1].append(instance)
    masks = {}
    for labels, members in layers:
        network_labels = to_network_space(model, labels, properties)
        masks.update({instance.instance_id: network_labels == instance.instance_id for instance in members})
    return masks


def instance_row(case: str, instance: LesionInstance, probability: np.ndarray, properties: dict,
                 network_mask: np.ndarray, per_fold: Sequence[np.ndarray] = ()) -> dict:
    """The instance's columns of instances.csv before its maps: identity, size, place, probability, uncertainty."""
    voxels = int(instance.mask.sum())
    centroid = world_coordinates(properties, np.argwhere(instance.mask).mean(axis=0))
    return {"case": case, "instance_id": instance.instance_id, "group": instance.group, "voxels": voxels,
            "volume_mm3": voxels * voxel_volume_mm3(properties),
            "centroid_x": centroid[0], "centroid_y": centroid[1], "centroid_z": centroid[2],
            "mean_probability": float(probability[instance.mask].mean()),
            "network_voxels": int(network_mask.sum()),
            **instance_uncertainty(instance.mask, probability, per_fold)}


SIGNED_STATISTICS = ("peak_pos", "peak_neg", "mean")  # per channel, of maps that may be negative
POSITIVE_STATISTICS = ("peak", "mean")  # of one map for all channels (Grad-CAM++ is non-negative)


def _statistics(values: np.ndarray, columns: dict[str, str]) -> dict[str, float]:
    """Statistics of `values` (peak_pos or peak: max, peak_neg: min, mean) under the given names; NaN if empty."""
    functions = {"peak_pos": np.max, "peak": np.max, "peak_neg": np.min, "mean": np.mean}
    return {column: np.nan if values.size == 0 else float(functions[stat](values)) for stat, column in columns.items()}


def _statistic_columns(method: Attribution | type[Attribution], channel_names: list[str]) -> dict[int, dict[str, str]]:
    """Per map channel, its statistics and their column names in instances.csv."""
    statistics = SIGNED_STATISTICS if method.per_channel else POSITIVE_STATISTICS
    return {index: {stat: peak_column(method.name, channel, stat) for stat in statistics}
            for index, channel in enumerate(method_channels(method.name, channel_names))}


def method_columns(method: type[Attribution], channel_names: list[str]) -> list[str]:
    """The columns of instances.csv that a method fills, in order."""
    columns = [column for names in _statistic_columns(method, channel_names).values() for column in names.values()]
    return columns + ([f"{method.name}_samples", f"{method.name}_rel_std_error"] if method.sampled else [])


def instance_maps(window: SlidingWindow, data: torch.Tensor, network_masks: dict[int, np.ndarray],
                  channel_names: list[str], settings: ExplainSettings, stream: str, engine: GradientEngine,
                  progress: bool = False) -> Iterator[tuple[Attribution, int, np.ndarray, dict[str, float]]]:
    """The run's maps, instance by instance, as (method, instance id, network-space map (channels, *spatial),
    its columns of instances.csv), method after method; each method yields a map as soon as it is done, so the
    caller can write and drop it. Statistics are taken in network space, where every case shares one spacing;
    `stream` names the noise stream (the case)."""
    for method in settings.attributions(stream):
        for instance_id, result in method.attribute(window, data, network_masks, engine, progress):
            full, mask = result.map, network_masks[instance_id]
            columns = {}
            for channel, names in _statistic_columns(method, channel_names).items():
                columns.update(_statistics(full[channel][mask], names))
            if method.sampled:
                columns.update({f"{method.name}_samples": result.samples,
                                f"{method.name}_rel_std_error": result.relative_standard_error})
            yield method, instance_id, full, columns


def explain_case(model: LoadedModel, case: str, files: list[Path], out_dir: Path, settings: ExplainSettings,
                 gt_file: Path | None = None, device: str = "cpu", progress: bool = False,
                 engine: GradientEngine | None = None) -> pd.DataFrame:
    """Predict, find instances and explain each one; writes `out_dir/<case>/` atomically, returns its table."""
    check_channels(files)
    ground_truth = None if gt_file is None else read_ground_truth(model, gt_file, files[0], settings.lesion_label)
    images, properties = read_images(model, files)
    data = preprocess_array(model, images, properties)
    window = model.sliding_window(settings.step_size, settings.use_mirroring, device)
    engine = engine or GradientEngine(amp=settings.amp)
    tensor = torch.from_numpy(data)
    probability, prediction = nnunet_prediction(model, tensor, properties, settings, device)
    per_fold = fold_probabilities(model, tensor, properties, settings.lesion_label, settings.step_size,
                                  settings.use_mirroring, device)
    instances = case_instances(prediction, ground_truth, settings.connectivity, settings.min_size, settings.rule,
                               settings.iou_threshold)
    network_masks = instance_network_masks(model, instances, properties) if instances else {}
    staging = out_dir / f".{case}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        instance_labels = np.zeros(prediction.shape, dtype=np.uint16)
        for instance in reversed(instances):  # predicted instances win where an FN lesion overlaps them
            instance_labels[instance.mask] = instance.instance_id
        write_volume(prediction.astype(np.uint8), staging / "prediction.nii.gz", properties)
        write_volume(instance_labels, staging / "instances.nii.gz", properties)
        rows = {instance.instance_id: instance_row(case, instance, probability, properties,
                                                   network_masks[instance.instance_id], per_fold)
                for instance in instances}
        for method, instance_id, network_map, columns in instance_maps(
                window, tensor, network_masks, model.channel_names, settings, case, engine, progress):
            channels = method_channels(method.name, model.channel_names)
            for volume, channel in zip(to_original_space(model, network_map, properties), channels):
                name = map_file_name(instance_id, channel if method.per_channel else None)
                write_volume(volume, staging / method.name / name, properties)
            rows[instance_id].update(columns)
    except Exception:  # a failed case leaves nothing; a killed run leaves the partial folder for merge to report
        shutil.rmtree(staging, ignore_errors=True)
        raise
    table = pd.DataFrame(list(rows.values()), columns=table_columns(model.channel_names, settings.methods))
    table.to_csv(staging / CASE_TABLE, index=False)
    _replace_folder(staging, out_dir / case)
    return table


def table_columns(channel_names: list[str], methods: str | Sequence[str]) -> list[str]:
    """Columns of the instance tables, in order."""
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    columns = ["case", "instance_id", "group", "voxels", "volume_mm3", "centroid_x", "centroid_y", "centroid_z",
               "mean_probability", "network_voxels", *UNCERTAINTY_COLUMNS]
    for method in ATTRIBUTIONS.values():
        if method.name in methods:
            columns += method_columns(method, channel_names)
    return columns


def _replace_folder(staging: Path, final: Path) -> None:
    """Move a completed staging folder into place, replacing an older result only once the new one is complete."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def run_record(model: LoadedModel, settings: ExplainSettings, images_dir: Path, gt_dir: Path | None,
               compute: ComputeOptions = ComputeOptions()) -> dict:
    """Parameters, model identity (with checkpoint hashes), seed and package versions of a run."""
    packages = {}
    for name in ("nnxai", "nnunetv2", "torch", "numpy", "scipy", "SimpleITK", "connected-components-3d"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"settings": asdict(settings), "compute": asdict(compute), "model": model.describe(),
            "images": str(images_dir),
            "file_ending": model.dataset_json["file_ending"],
            "ground_truth": str(gt_dir) if gt_dir else None, "channels": model.channel_names,
            "python": platform.python_version(), "packages": packages,
            "saliency_statistics_space": "network (preprocessed) space, one spacing for all cases",
            "noise_channel_note": noise_channel_note(model.channel_names) if "smoothgrad" in settings.methods else None}


def noise_channel_note(channel_names: list[str]) -> str | None:
    """Why the noise sigma is not taken from FLAIR, when no channel is named so; None when one is."""
    if channel_index(channel_names, "FLAIR") is not None:
        return None
    return (f"no input channel is named FLAIR in dataset.json ({', '.join(channel_names)}): the SmoothGrad noise "
            f"sigma is taken from the range of channel 0 ({channel_names[0]})")


def _check_resumable(out_dir: Path, record: dict, overwrite: bool) -> None:
    """Refuse to mix outputs of different settings or models in one folder unless --overwrite is given."""
    path = out_dir / RUN_RECORD
    if overwrite or not path.is_file():
        return
    previous = json.loads(path.read_text())
    for key in ("settings", "model", "ground_truth"):
        if previous.get(key) != json.loads(json.dumps(record[key])):
            raise CaseError(f"{path}: this folder holds a run with other {key}; use another -o or --overwrite")


def collect_tables(out_dir: Path) -> pd.DataFrame:
    """The cohort table: every finished case's instance table, concatenated."""
    return concat_tables(p for p in out_dir.glob(f"*/{CASE_TABLE}") if not p.parent.name.startswith("."))


def prepare_output_folder(out_dir: Path) -> None:
    """Create the output folder and check that this process may write there, before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CaseError(f"{out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaseError(f"{out_dir}: cannot create the output folder ({error.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise CaseError(f"{out_dir}: output folder is not writable")


def check_settings(model: LoadedModel, settings: ExplainSettings) -> ExplainSettings:
    """Refuse unknown choices (one line each) and fill in the Grad-CAM++ layer, checked against the network."""
    choices = {"method": (settings.methods, METHODS), "aggregation": ((settings.aggregation,), AGGREGATIONS),
               "Grad-CAM++ variant": ((settings.gradcampp_variant,), VARIANTS),
               "amp": ((settings.amp,) if settings.amp else (), tuple(AMP_DTYPES))}
    for what, (given, allowed) in choices.items():
        unknown = [value for value in given if value not in allowed]
        if unknown:
            raise CaseError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(allowed)}")
    if not settings.methods:
        raise CaseError(f"no method given; choose from {', '.join(METHODS)}")
    try:
        sampling = settings.sampling()
    except ValueError as error:
        raise CaseError(f"samples {settings.samples!r}: {error}") from None
    settings = replace(settings, samples=sampling.samples or "auto", antithetic=sampling.antithetic)
    if settings.noise_channel is None:
        settings = replace(settings, noise_channel=channel_index(model.channel_names, "FLAIR") or 0)
    if "gradcampp" not in settings.methods:
        return settings
    network = model.networks[0]
    try:
        layer = settings.layer or default_layer(network)
        check_layer(network, layer, model.configuration_manager.patch_size, len(model.channel_names))
    except LayerError as error:
        raise CaseError(str(error)) from None
    return replace(settings, layer=layer)


def explain_cohort(model: LoadedModel, images_dir: Path, out_dir: Path, settings: ExplainSettings,
                   gt_dir: Path | None = None, num_parts: int = 1, part_id: int = 0, overwrite: bool = False,
                   device: str = "cpu", progress: bool = True,
                   compute: ComputeOptions = ComputeOptions()) -> CohortResult:
    """Explain every case of an nnU-Net input folder (one shard of it), skipping cases already finished.

    One gradient engine serves all cases, so the backward mode is measured once (`compute.backward="auto"`).
    """
    settings = check_settings(model, settings)
    engine = compute.engine(settings.amp)
    file_ending = model.dataset_json["file_ending"]
    cases = find_cases(images_dir, file_ending, len(model.channel_names))
    prepare_output_folder(out_dir)
    record = run_record(model, settings, images_dir, gt_dir, compute)
    if record["noise_channel_note"]:
        tqdm.write(f"note: {record['noise_channel_note']}", file=sys.stderr)
    _check_resumable(out_dir, record, overwrite)
    write_atomically(out_dir / RUN_RECORD, json.dumps(record, indent=2, default=str) + "\n")

    def explain(case: str) -> None:
        gt_file = None if gt_dir is None else gt_dir / f"{case}{file_ending}"
        try:
            explain_case(model, case, cases[case], out_dir, settings, gt_file, device, progress, engine)
        except GradientError as error:  # a memory budget or precision that no case can work with: stop the run
            raise InputError(f"{case}: {error}") from None

    result = run_resumable(shard(list(cases), num_parts, part_id),
                           lambda case: (out_dir / case / CASE_TABLE).is_file() and not overwrite, explain,
                           progress=progress)
    write_atomically(out_dir / CASE_TABLE, collect_tables(out_dir).to_csv(index=False))
    if engine.timings:  # the backward mode "auto" chose, and the seconds that decided it
        record["compute"].update(backward_chosen=engine.chosen, backward_seconds=engine.timings)
        write_atomically(out_dir / RUN_RECORD, json.dumps(record, indent=2, default=str) + "\n")
    return result
