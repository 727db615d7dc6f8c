"""What the sanity checks share: reopening an `nnxai explain` output folder and re-running its model.

A check works on a finished explain run (OUT): the model, the images and the settings come from
`OUT/run.json`, the lesion instances from `OUT/<case>/instances.nii.gz` and `OUT/instances.csv`.
Everything is computed in network space (nnU-Net's preprocessed grid), where the maps are made.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from nnxai.attribution.engine import GradientEngine
from nnxai.errors import InputError
from nnxai.experiments.common import ExperimentError, load_run_model, recorded_run
from nnxai.explain.cases import find_cases
from nnxai.explain.output import GROUP_ORDER, AnalysisInputError, load_explain_output
from nnxai.explain.settings import METHODS, ExplainSettings
from nnxai.files import write_atomically
from nnxai.nnunet.geometry import preprocess, to_network_space
from nnxai.nnunet.model import LoadedModel
from nnxai.nnunet.sliding_window import Slices, SlidingWindow

SANITY_FOLDER = "sanity"


class SanityError(InputError):
    """Bad input to a sanity check; the message names the file or option and the problem in one line."""


def recompute_maps(method: str, window: SlidingWindow, data: torch.Tensor, masks: dict[int, np.ndarray],
                   settings: ExplainSettings, case: str) -> dict[int, np.ndarray]:
    """One method's maps exactly as `nnxai explain` made them for `case` (same settings and noise stream), per
    instance as (C, *spatial): one map per input channel, or one for all channels."""
    attribution = settings.attribution(method, case)
    return {instance_id: result.map
            for instance_id, result in attribution.attribute(window, data, masks, GradientEngine(amp=settings.amp))}


def check_methods(methods: Sequence[str]) -> None:
    """Refuse a method no check can recompute."""
    for method in methods:
        if method not in METHODS:
            raise SanityError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@dataclass
class CaseInput:
    """One case in network space: the preprocessed input and the instance labels on the same grid."""

    case: str
    data: torch.Tensor
    properties: dict
    instance_labels: np.ndarray

    def mask(self, instance_id: int) -> np.ndarray:
        return self.instance_labels == instance_id


@dataclass
class ExplainRun:
    """A finished `nnxai explain` output folder with its model loaded again."""

    out_dir: Path
    settings: ExplainSettings
    model: LoadedModel
    images_dir: Path
    instances: pd.DataFrame

    @property
    def channel_names(self) -> list[str]:
        return self.model.channel_names

    @property
    def sanity_dir(self) -> Path:
        return self.out_dir / SANITY_FOLDER

    def network_spacing(self) -> list[float]:
        return [float(s) for s in self.model.configuration_manager.spacing]

    def window(self, device: str = "cpu", networks: Sequence[torch.nn.Module] | None = None) -> SlidingWindow:
        """The run's sliding window (step, mirroring) over the model's networks or over replacements of them."""
        window = self.model.sliding_window(self.settings.step_size, self.settings.use_mirroring, device)
        if networks is None:
            return window
        return SlidingWindow([n.to(device) for n in networks], window.patch_size, window.step_size,
                             window.mirror_axes, device=device)

    def case_input(self, case: str) -> CaseInput:
        """Preprocess the case's images as explain did and bring its instance labels onto the network grid."""
        files = find_cases(self.images_dir, self.model.dataset_json["file_ending"], len(self.channel_names)).get(case)
        if files is None or not all(f.is_file() for f in files):
            raise SanityError(f"{self.images_dir}: images of case {case} are missing (use --images)")
        data, properties = preprocess(self.model, files)
        labels_file = self.out_dir / case / "instances.nii.gz"
        if not labels_file.is_file():
            raise SanityError(f"{labels_file}: missing; explain this case again")
        labels, _ = self.model.plans_manager.image_reader_writer_class().read_seg([str(labels_file)])
        network_labels = to_network_space(self.model, labels[0].astype(np.int32), properties)
        return CaseInput(case, torch.from_numpy(data), properties, network_labels)


def load_run(out_dir: Path, images_dir: Path | None = None, trust_checkpoint: bool = False) -> ExplainRun:
    """Reopen an explain output folder: its settings, its model (checked against the recorded hashes) and instances.

    The folder is read as the analyses read it (`OUT/run.json`, `OUT/instances.csv`, case names kept as text).
    """
    try:
        output = load_explain_output(Path(out_dir))
    except AnalysisInputError as error:
        raise SanityError(str(error)) from None
    try:
        recorded = recorded_run(output)
        model = load_run_model(recorded, trust_checkpoint=trust_checkpoint)
    except ExperimentError as error:
        raise SanityError(error.message) from None
    images_dir = Path(images_dir or recorded.images_dir)
    if not images_dir.is_dir():
        raise SanityError(f"{images_dir}: input folder of the explain run not found (use --images)")
    return ExplainRun(out_dir, recorded.settings, model, images_dir, output.instances)


def select_instances(run: ExplainRun, cases: Sequence[str] = (), groups: Sequence[str] = (),
                     max_instances: int | None = None) -> pd.DataFrame:
    """Instances to check, taking groups in turn (TP, FP, FN, ...) so each group is represented; by case and id."""
    table = run.instances
    if table.empty:
        raise SanityError(f"{run.out_dir}: no explained instances")
    unknown = sorted(set(cases) - set(table.case))
    if unknown:
        raise SanityError(f"{run.out_dir}: no explained case named {unknown[0]}")
    chosen = table[table.network_voxels > 0]
    if cases:
        chosen = chosen[chosen.case.isin(cases)]
    if groups:
        chosen = chosen[chosen.group.isin(groups)]
    if chosen.empty:
        raise SanityError(f"{run.out_dir}: no instance matches the selection")
    group_rank = chosen.group.map({g: i for i, g in enumerate(GROUP_ORDER)}).fillna(len(GROUP_ORDER))
    turn = chosen.assign(_turn=chosen.groupby("group").cumcount(), _group=group_rank)
    chosen = turn.sort_values(["_turn", "_group"], kind="stable").head(max_instances)
    return chosen.drop(columns=["_turn", "_group"]).sort_values(["case", "instance_id"]).reset_index(drop=True)


def instance_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> Slices:
    """Bounding box of a mask grown by `margin_mm` on every side (voxels per axis from the spacing), clipped."""
    where = np.argwhere(mask)
    margin = [int(np.ceil(margin_mm / s)) for s in spacing]
    return tuple(slice(max(int(low) - m, 0), min(int(high) + 1 + m, size))
                 for low, high, m, size in zip(where.min(0), where.max(0), margin, mask.shape))


def instance_logits(window: SlidingWindow, data: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Blended logits (K, n) at the instance's voxels, from the tiles that overlap it only.

    Every tile covering an instance voxel overlaps the instance, so the values equal those of the whole
    sliding window at these voxels; the other tiles are skipped.
    """
    layout = window.layout(data.shape[1:])
    tiles = layout.tiles_touching(window.padded_mask(mask))
    return window.logits(data, tiles, layout)[:, torch.as_tensor(np.asarray(mask, dtype=bool), device=window.device)]


def write_outputs(folder: Path, outputs: dict[str, pd.DataFrame | Figure | dict]) -> list[Path]:
    """Write tables (CSV), figures (PNG) and records (JSON) into `folder`, each through a temporary name."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in outputs.items():
        path = folder / name
        if isinstance(content, Figure):
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            content.savefig(temporary, format="png", dpi=120)
            os.replace(temporary, path)
        elif isinstance(content, pd.DataFrame):
            write_atomically(path, content.to_csv(index=False))
        else:
            write_atomically(path, json.dumps(content, indent=2, default=str) + "\n")
        written.append(path)
    return written
