"""Memory `nnxai explain` holds for the gradient of one sliding-window tile (GPU memory, or RAM with -device cpu).

Gradients are taken one tile and one pass (fold network and mirroring) at a time; autograd keeps what that pass
saved until its backward pass, so one pass's graph plus the weights of every fold set the peak, whatever the
number of folds and mirrorings (convolutions keep only their weights: nnxai.attribution.input_gradients). This script plans nnU-Net's default
3d_fullres network for a dataset of the given median shape and spacing (nnU-Net's own ExperimentPlanner on a
stand-in fingerprint), runs one forward pass on the meta device (shapes only: no memory, no GPU needed) and adds
up the tensors autograd saves. Counted this way, a 64^3 patch on the CPU saves exactly the bytes real tensors do.

    python benchmarks/gpu_memory.py                              # 1 mm brain, FLAIR + T1
    python benchmarks/gpu_memory.py --shape 180 220 180 --spacing 0.8 0.8 0.8
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import click
import numpy as np
import SimpleITK as sitk
import torch

from nnxai.attribution.input_gradients import input_gradients_only

DATASET = "Dataset999_MemoryEstimate"
MIRRORINGS = 8  # nnU-Net mirrors 3D patches along all three axes: 2^3 flips
GIB = 2 ** 30


def default_plan(shape: tuple[int, ...], spacing: tuple[float, ...], channels: int) -> dict:
    """nnU-Net's 3d_fullres configuration for `channels`-channel cases of median `shape` (voxels) and `spacing`."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    with tempfile.TemporaryDirectory() as workspace:
        raw = Path(workspace, "raw", DATASET)
        preprocessed = Path(workspace, "preprocessed", DATASET)
        for folder in (raw / "imagesTr", raw / "labelsTr", preprocessed):
            folder.mkdir(parents=True)
        example = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8))  # lets nnU-Net pick its image reader
        for name in [f"imagesTr/case_{c:04d}" for c in range(channels)] + ["labelsTr/case"]:
            sitk.WriteImage(example, str(raw / f"{name}.nii.gz"))
        (raw / "dataset.json").write_text(json.dumps({
            "channel_names": {str(c): f"channel{c}" for c in range(channels)}, "labels": {"background": 0, "lesion": 1},
            "numTraining": 1, "file_ending": ".nii.gz"}))
        intensities = {"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0, "percentile_00_5": 0.0,
                       "percentile_99_5": 1.0, "std": 0.2}
        (preprocessed / "dataset_fingerprint.json").write_text(json.dumps({
            "spacings": [list(spacing)], "shapes_after_crop": [list(shape)],
            "foreground_intensity_properties_per_channel": {str(c): intensities for c in range(channels)},
            "median_relative_size_after_cropping": 1.0}))
        os.environ.update(nnUNet_raw=str(raw.parent), nnUNet_preprocessed=str(preprocessed.parent))
        with contextlib.redirect_stdout(io.StringIO()):
            plans = ExperimentPlanner(DATASET).plan_experiment()
    return plans["configurations"]["3d_fullres"]


def saved_bytes_per_pass(configuration: dict, channels: int, classes: int = 2) -> tuple[int, int, int]:
    """(bytes autograd saves in one forward pass of one patch, of which parameters, number of parameters)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = configuration["architecture"]
    with torch.device("meta"):
        network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                         architecture["_kw_requires_import"], channels, classes, allow_init=True,
                                         deep_supervision=False)
    saved = {}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    patch = torch.zeros((1, channels, *configuration["patch_size"]), device="meta", requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor), input_gradients_only():
        network(patch)
    parameters = sum(p.numel() for p in network.parameters())
    return sum(saved.values()), parameters * 4, parameters


@click.command()
@click.option("--shape", nargs=3, type=int, default=(140, 172, 140), show_default=True,
              help="Median case shape after cropping to the head, in voxels.")
@click.option("--spacing", nargs=3, type=float, default=(1.0, 1.0, 1.0), show_default=True, help="Median spacing, mm.")
@click.option("--channels", type=int, default=2, show_default=True)
def main(shape, spacing, channels) -> None:
    """Print the memory one tile's gradient needs for each choice of folds and mirroring (the same for both:
    passes are differentiated one at a time; only the folds' weights add up)."""
    configuration = default_plan(tuple(shape), tuple(spacing), channels)
    saved, weights, parameters = saved_bytes_per_pass(configuration, channels)
    activations = saved - weights
    patch = configuration["patch_size"]
    features = configuration["architecture"]["arch_kwargs"]["features_per_stage"]
    print(f"3d_fullres plan: patch {'x'.join(map(str, patch))}, {len(features)} stages, "
          f"features {features[0]}-{features[-1]}, {parameters / 1e6:.1f} M parameters")
    print(f"one forward pass saves {activations / GIB:.2f} GiB of activations and {weights / GIB:.2f} GiB of weights")
    print("folds  mirroring   one pass's graph and all folds' weights")
    for folds in (1, 5):
        for label in ("off", f"on ({MIRRORINGS})"):
            print(f"{folds:<6} {label:<11} {(activations + folds * weights) / GIB:6.1f} GiB")
    padded = np.maximum(shape, patch)
    print(f"plus per instance at most {channels * int(np.prod(padded)) * 4 / 2 ** 20:.0f} MiB "
          f"(its gradient over the tiles it touches, float32)")


if __name__ == "__main__":
    main()
