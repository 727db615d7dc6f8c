"""What the sanity checks share: recomputing a run's maps, choosing instances, logits near one, writing results.

A check works on a finished explain run (OUT) opened again with its model (`explain.reopen`): the images and
the settings come from `OUT/run.json`, the lesion instances from `OUT/<case>/instances.nii.gz` and
`OUT/instances.csv`. Everything is computed in network space (nnU-Net's preprocessed grid), where the maps are made.
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
from nnxai.explain.output import GROUP_ORDER
from nnxai.explain.reopen import ReopenedRun
from nnxai.explain.settings import METHODS, ExplainSettings
from nnxai.files import write_atomically
from nnxai.nnunet.sliding_window import Slices, SlidingWindow


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


@dataclass(frozen=True)
class InstanceSelection:
    """Which instances a check takes (cases, groups, how many), with which methods, in how large a box."""

    cases: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    max_instances: int = 5
    methods: tuple[str, ...] = ()  # empty: the run's methods
    margin_mm: float = 5.0

    def chosen(self, run: ReopenedRun) -> tuple[pd.DataFrame, list[str]]:
        """The selected instances and the checked methods, unknown methods refused."""
        methods = list(self.methods) or list(run.settings.methods)
        check_methods(methods)
        return select_instances(run, self.cases, self.groups, self.max_instances), methods


def select_instances(run: ReopenedRun, cases: Sequence[str] = (), groups: Sequence[str] = (),
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
