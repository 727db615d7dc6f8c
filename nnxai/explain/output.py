"""Reading an `nnxai explain` output folder (OUT) for the analyses: its run record, tables and maps.

Every problem with the folder is raised as `AnalysisInputError` with one line naming the file and the cause.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from nnxai.errors import InputError
from nnxai.explain.settings import ATTRIBUTIONS, ExplainSettings

RUN_RECORD = "run.json"
CASE_TABLE = "instances.csv"  # each case's instance table, and the cohort's
INSTANCE_COLUMNS = ("case", "instance_id", "group")
PEAKS = ("peak_pos", "peak_neg")
GROUP_ORDER = ("TP", "FP", "FN", "synthetic", "unknown")
ALL_CHANNELS = "all"  # the channel label of a method's one map for all input channels


class AnalysisInputError(InputError):
    """An input the analyses cannot use; the message names the file and the problem in one line."""


@dataclass(frozen=True)
class ExplainOutput:
    """One explain output folder: run record (settings, channels, input folder) and the cohort table."""

    folder: Path
    record: dict
    instances: pd.DataFrame

    @property
    def channels(self) -> list[str]:
        return list(self.record["channels"])

    @property
    def methods(self) -> list[str]:
        settings = self.record.get("settings", {})
        return list(settings.get("methods", [settings.get("method", "smoothgrad")]))

    @property
    def method(self) -> str:
        """The first method: the one the analyses read unless told otherwise."""
        return self.methods[0]

    @property
    def settings(self) -> ExplainSettings:
        """The recorded settings (keys this version does not know are left out)."""
        known = {f.name for f in fields(ExplainSettings)}
        return self._parsed(lambda: ExplainSettings(**{k: v for k, v in self.record["settings"].items() if k in known}))

    @property
    def model_record(self) -> dict:
        """The explained model: folder, folds, checkpoint and the checkpoints' sha256."""
        def read() -> dict:
            model = self.record["model"]
            return {"folder": Path(model["folder"]), "folds": [str(f) for f in model["folds"]],
                    "checkpoint": str(model["checkpoint"]),
                    "checkpoint_sha256": dict(model.get("checkpoint_sha256") or {})}
        return self._parsed(read)

    @property
    def images_dir(self) -> Path:
        return self._parsed(lambda: Path(self.record["images"]))

    @property
    def gt_dir(self) -> Path | None:
        return Path(self.record["ground_truth"]) if self.record.get("ground_truth") else None

    def _parsed(self, read):
        """`read()` of the record, a malformed record refused in one line."""
        try:
            return read()
        except (KeyError, TypeError, AttributeError) as error:
            raise AnalysisInputError(f"{self.folder / RUN_RECORD}: not an nnxai explain run record "
                                     f"({error!r})") from None

    @property
    def experiments(self) -> Path:
        return self.folder / "experiments"

    @property
    def sanity(self) -> Path:
        return self.folder / "sanity"

    def instance_labels_path(self, case: str) -> Path:
        return self.folder / case / "instances.nii.gz"

    def map_path(self, case: str, instance_id: int, channel: str, method: str | None = None) -> Path:
        """One map file of an instance; `channel` is ignored for a method with one map for all channels."""
        method = method or self.method
        return self.folder / case / method / map_file_name(instance_id, channel if per_channel(method) else None)

    def map_files(self, case: str, instance_id: int, method: str | None = None) -> dict[str, Path]:
        """An instance's map files by channel: one per input channel, or one labelled `ALL_CHANNELS`."""
        method = method or self.method
        return {channel: self.map_path(case, instance_id, channel, method)
                for channel in method_channels(method, self.channels)}

    def image_path(self, case: str, channel: str) -> Path | None:
        """The input image of one channel (`<images>/<case>_<index:04d><file_ending>`), or None if it is not there."""
        images = self.record.get("images")
        if not images or channel not in self.channels:
            return None
        stem = f"{case}_{self.channels.index(channel):04d}"
        ending = self.record.get("file_ending")
        matches = [Path(images) / f"{stem}{ending}"] if ending else sorted(Path(images).glob(f"{stem}.*"))
        return next((m for m in matches if m.is_file()), None)

    def flair_channel(self) -> str:
        """The channel named FLAIR (any case), else the first channel."""
        return next((c for c in self.channels if c.upper() == "FLAIR"), self.channels[0])


def read_run_record(folder: Path) -> dict:
    """OUT/run.json, refusing a folder that explain did not write."""
    folder = Path(folder)
    record_path = folder / RUN_RECORD
    if not folder.is_dir():
        raise AnalysisInputError(f"{folder}: no such folder")
    if not record_path.is_file():
        raise AnalysisInputError(f"{record_path}: missing; {folder} is not an nnxai explain output folder")
    try:
        return json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnalysisInputError(f"{record_path}: not valid JSON ({error})") from None


def load_explain_output(folder: Path) -> ExplainOutput:
    """Read OUT/run.json and OUT/instances.csv, refusing a folder that is not an explain output."""
    folder = Path(folder)
    record_path = folder / RUN_RECORD
    record = read_run_record(folder)
    if not isinstance(record, dict) or not isinstance(record.get("channels"), list) or not record["channels"]:
        raise AnalysisInputError(f"{record_path}: no list of channels; not an nnxai run record")
    instances = read_table(folder / CASE_TABLE, INSTANCE_COLUMNS)
    return ExplainOutput(folder, record, instances)


def read_table(path: Path, columns: Iterable[str] = ()) -> pd.DataFrame:
    """A CSV table that must exist and hold `columns`; case names stay text ("001" is not the number 1)."""
    if not path.is_file():
        raise AnalysisInputError(f"{path}: missing")
    try:
        table = pd.read_csv(path, dtype={"case": str})
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise AnalysisInputError(f"{path}: not a readable CSV table ({str(error).splitlines()[0]})") from None
    require_columns(table, columns, path)
    return table


def require_columns(table: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise AnalysisInputError(f"{path}: missing column(s) {', '.join(missing)}")


def per_channel(method: str) -> bool:
    """Whether a method makes one map per input channel (else one for all channels)."""
    if method not in ATTRIBUTIONS:
        raise AnalysisInputError(f"unknown method {method!r}; choose from {', '.join(ATTRIBUTIONS)}")
    return ATTRIBUTIONS[method].per_channel


def method_channels(method: str, channels: list[str]) -> list[str]:
    """The channel labels of a method's maps: the input channels, or `ALL_CHANNELS` for one map of all."""
    return list(channels) if per_channel(method) else [ALL_CHANNELS]


def map_file_name(instance_id: int, channel: str | None) -> str:
    """`<id>_<CHANNEL>.nii.gz` of a per-channel map, `<id>.nii.gz` of a map for all channels (channel None)."""
    return f"{int(instance_id):03d}{'' if channel is None else f'_{channel}'}.nii.gz"


def statistic_prefix(method: str, channel: str) -> str:
    """Prefix of a map's statistics in the tables: `smoothgrad_FLAIR`, or the method alone (`gradcampp`) for a map
    of all channels."""
    return f"{method}_{channel}" if per_channel(method) else method


def peak_column(method: str, channel: str, peak: str) -> str:
    """Column name of a saliency statistic in the instance tables, e.g. `smoothgrad_FLAIR_peak_pos`."""
    return f"{statistic_prefix(method, channel)}_{peak}"


def ordered_groups(groups: Iterable[str]) -> list[str]:
    """Groups in the study's order (TP, FP, FN, synthetic, unknown), any others after them."""
    present = list(dict.fromkeys(groups))
    return [g for g in GROUP_ORDER if g in present] + sorted(g for g in present if g not in GROUP_ORDER)


def read_volume(path: Path, canonical: bool = False) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Voxel array (nibabel order), voxel spacing in mm and affine of a NIfTI file; RAS-reoriented if `canonical`."""
    if not path.is_file():
        raise AnalysisInputError(f"{path}: missing")
    try:
        image = nib.load(path)
        if canonical:
            image = nib.as_closest_canonical(image)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for damaged files
        raise AnalysisInputError(f"{path}: not a readable NIfTI image ({error})") from None
    if data.ndim != 3:
        raise AnalysisInputError(f"{path}: expected a 3D image, got shape {data.shape}")
    return data, tuple(float(z) for z in image.header.get_zooms()[:3]), image.affine
