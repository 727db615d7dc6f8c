"""Gradient check: is the map really the gradient of the instance's target through this network?

The map without noise (SmoothGrad with one sample and zero noise, computed as `nnxai explain` computes
it, in float32) must equal the derivative of the instance's target, the lesion logit of the blended
sliding-window prediction summed over the instance's voxels. Central finite differences of that
target, in float64 on a float64 copy of the network, give the derivative at a few voxels: those where
the map is largest in each channel. A custom trainer whose network breaks autograd (detached tensors,
non-differentiable operations, in-place surprises) shows up as a large relative error.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nnxai.attribution.smoothgrad import instance_smoothgrad
from nnxai.explain.reopen import ReopenedRun
from nnxai.sanity.common import SanityError, instance_logits, select_instances, write_outputs

COLUMNS = ["case", "instance_id", "group", "channel", "z", "y", "x", "map_value", "finite_difference",
           "absolute_error", "relative_error"]
VERDICT_COLUMNS = ["case", "instance_id", "group", "voxels", "step", "max_relative_error", "tolerance", "verdict"]


def choose_instance(run: ReopenedRun, case: str | None = None, instance_id: int | None = None) -> tuple[str, int]:
    """The instance to check: as given, else the first one (by case, then id) that matches what is given."""
    chosen = select_instances(run, [case] if case else ())
    if instance_id is not None:
        chosen = chosen[chosen.instance_id == instance_id]
    if chosen.empty:
        raise SanityError(f"{run.out_dir}: no instance {instance_id} in {f'case {case}' if case else 'any case'}")
    return str(chosen.case.iloc[0]), int(chosen.instance_id.iloc[0])


def largest_voxels(gradient: np.ndarray, per_channel: int) -> list[tuple[int, ...]]:
    """(channel, z, y, x) of the `per_channel` largest-magnitude values of each channel, largest first."""
    chosen = []
    for channel, values in enumerate(gradient):
        flat = np.argsort(-np.abs(values).ravel(), kind="stable")[:per_channel]
        chosen += [(channel, *(int(i) for i in np.unravel_index(f, values.shape))) for f in flat]
    return chosen


def gradient_check(run: ReopenedRun, case: str, instance_id: int, voxels: int = 3, step: float = 1e-3,
                   device: str = "cpu") -> pd.DataFrame:
    """Map value vs. central finite difference (float64) at the largest-map voxels of each channel of one instance."""
    rows = run.instances[(run.instances.case == case) & (run.instances.instance_id == instance_id)]
    case_input = run.case_input(case)
    mask = case_input.mask(instance_id)
    if not mask.any():
        raise SanityError(f"{run.out_dir / case / 'instances.nii.gz'}: instance {instance_id} has no voxel "
                          "in network space")
    lesion = run.settings.lesion_label
    gradient = instance_smoothgrad(run.window(device), case_input.data, {instance_id: mask}, samples=1, noise=0.0,
                                   lesion_channel=lesion)[instance_id]
    precise_device = "cpu" if device == "mps" else device  # MPS has no float64
    window = run.window(precise_device, [copy.deepcopy(n).double() for n in run.model.networks])
    data = case_input.data.double()

    def target(values: torch.Tensor) -> float:
        with torch.no_grad():
            return float(instance_logits(window, values, mask)[lesion].sum())

    table = []
    for voxel in largest_voxels(gradient, voxels):
        shifted = [data.clone(), data.clone()]
        shifted[0][voxel] += step
        shifted[1][voxel] -= step
        difference = (target(shifted[0]) - target(shifted[1])) / (2 * step)
        value = float(gradient[voxel])
        error = abs(value - difference)
        scale = max(abs(value), abs(difference))
        table.append({"case": case, "instance_id": instance_id, "group": rows.group.iloc[0],
                      "channel": run.channel_names[voxel[0]], "z": voxel[1], "y": voxel[2], "x": voxel[3],
                      "map_value": value, "finite_difference": difference, "absolute_error": error,
                      "relative_error": error / scale if scale > 0 else 0.0})
    return pd.DataFrame(table, columns=COLUMNS)


def gradcheck_verdict(table: pd.DataFrame, step: float, tolerance: float = 1e-2) -> pd.DataFrame:
    """One row: the largest relative error over the checked voxels and "passes" when it is below tolerance."""
    worst = float(table.relative_error.max())
    first = table.iloc[0]
    return pd.DataFrame([{"case": first.case, "instance_id": first.instance_id, "group": first.group,
                          "voxels": len(table), "step": step, "max_relative_error": worst, "tolerance": tolerance,
                          "verdict": "passes" if worst < tolerance else "fails"}], columns=VERDICT_COLUMNS)


def write_gradcheck(run: ReopenedRun, table: pd.DataFrame, verdict: pd.DataFrame) -> list[Path]:
    """OUT/sanity/gradcheck.csv (one row per voxel) and gradcheck_verdict.csv (one row)."""
    return write_outputs(run.output.sanity, {"gradcheck.csv": table, "gradcheck_verdict.csv": verdict})
