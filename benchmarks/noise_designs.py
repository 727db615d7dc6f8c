"""Noise designs for SmoothGrad's Monte Carlo mean (issue 4): does anything beat antithetic pairs?

A design draws one Gaussian noise e, splits it into independent blocks b_1 ... b_k (e = sum b_j) and uses
every sign pattern sum_j s_j b_j, s in {-1, 1}^k, as a group of 2^k samples. The blocks are independent
Gaussians (disjoint channels or voxels, or orthogonal frequency bands), so every sample is again N(0, sigma^2 I)
and each design estimates the same SmoothGrad map; a group's mean cancels every term of the gradient's
response to the noise that is odd in some block. Antithetic pairs are the design with one block.

Measured on one tile of the network centred on each instance, with the instance's lesion-logit sum as the
target: for each design, the relative standard error of one sample's worth (the relative standard deviation
of the group means times the square root of the group size, over the same number of samples per design), and
from it the samples needed for a relative standard error of --tol.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pandas as pd
import torch

from benchmarks.explain_benchmark import cpu_plan_network, integers, phantom_case, spread
from nnxai.attribution.smoothgrad import noise_sigma
from nnxai.nnunet.checkpoint import load_checkpoint
from nnxai.nnunet.plans import CPU_FEATURES

Split = Callable[[torch.Tensor], list[torch.Tensor]]


def whole(noise: torch.Tensor) -> list[torch.Tensor]:
    return [noise]


def by_channel(noise: torch.Tensor) -> list[torch.Tensor]:
    return [noise * (torch.arange(len(noise)) == c).view(-1, *[1] * (noise.dim() - 1)) for c in range(len(noise))]


def by_checkerboard(noise: torch.Tensor) -> list[torch.Tensor]:
    parity = torch.from_numpy(np.indices(noise.shape[1:]).sum(0) % 2)
    return [noise * (parity == p) for p in (0, 1)]


def by_frequency(noise: torch.Tensor, cutoff: float = 0.125) -> list[torch.Tensor]:
    """Spatial frequencies below `cutoff` (cycles per voxel) and the rest: orthogonal projections."""
    axes = tuple(range(1, noise.dim()))
    frequency = torch.stack(torch.meshgrid(*[torch.fft.fftfreq(n) for n in noise.shape[1:]], indexing="ij"))
    low = torch.fft.ifftn(torch.fft.fftn(noise, dim=axes) * (frequency.norm(dim=0) < cutoff), dim=axes).real
    return [low, noise - low]


def by_channel_and_frequency(noise: torch.Tensor) -> list[torch.Tensor]:
    return [band for channel in by_channel(noise) for band in by_frequency(channel)]


DESIGNS: dict[str, Split | None] = {"independent": None, "antithetic": whole, "channels": by_channel,
                                    "checkerboard": by_checkerboard, "frequency bands": by_frequency,
                                    "channels x frequency bands": by_channel_and_frequency}


def group(noise: torch.Tensor, split: Split | None) -> list[torch.Tensor]:
    """The samples of one group: the draw itself, or every sign pattern of its blocks."""
    if split is None:
        return [noise]
    blocks = split(noise)
    return [sum(b if (pattern >> j) & 1 == 0 else -b for j, b in enumerate(blocks))
            for pattern in range(2 ** len(blocks))]


def relative_error_per_sample(gradient: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...],
                              sigma: float, split: Split | None, samples: int, generator: torch.Generator) -> float:
    """Relative standard error of the mean map of one sample's worth of this design (about `samples` used)."""
    means, used = [], 0
    while used < samples or len(means) < 2:
        draws = group(torch.randn(shape, generator=generator) * sigma, split)
        means.append(torch.stack([gradient(draw) for draw in draws]).mean(0))
        used += len(draws)
    stacked = torch.stack(means)
    return float(stacked.var(0).sum().sqrt() / stacked.mean(0).norm() * math.sqrt(len(draws)))


def centred_tile(shape: tuple[int, ...], mask: np.ndarray, patch: int) -> tuple[slice, ...]:
    """The patch-sized box centred on the mask's centre of mass, moved inside the volume."""
    centre = np.argwhere(mask).mean(0).round().astype(int)
    return tuple(slice(start, start + patch) for start in
                 (min(max(0, c - patch // 2), n - patch) for c, n in zip(centre, shape)))


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/nnxai-benchmark"), show_default=True)
@click.option("--case", default="phantom_001", show_default=True)
@click.option("--cases", default=12, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--spacing", default=2.0, show_default=True)
@click.option("--patch", default=32, show_default=True)
@click.option("--features", default=",".join(map(str, CPU_FEATURES)), show_default=True)
@click.option("--convs", default=2, show_default=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A checkpoint of this architecture (default: He initialization).")
@click.option("--instances", default=6, show_default=True, help="Lesions, spread over the size range.")
@click.option("--min-size", default=6, show_default=True, help="Smallest lesion in voxels (the study's).")
@click.option("--samples", default=160, show_default=True, help="Samples per design and instance.")
@click.option("--noise", default=0.05, show_default=True)
@click.option("--tol", default=0.05, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def main(workdir, case, cases, seed, spacing, patch, features, convs, weights, instances, min_size, samples, noise,
         tol, threads, json_path) -> None:
    """Relative standard error per sample of each noise design, on one tile around each of a case's lesions."""
    torch.set_num_threads(threads)
    case, data, labels = phantom_case(workdir, case, cases, seed, spacing)
    if min(data.shape[1:]) < patch:
        raise click.ClickException(f"{case}: network input {tuple(data.shape[1:])} is smaller than --patch {patch}")
    network = cpu_plan_network(integers(features), convs, (patch,) * 3, seed)
    if weights is not None:
        network.load_state_dict(load_checkpoint(weights)["network_weights"])
    network.eval()
    sizes = {int(i): int((labels == i).sum()) for i in np.unique(labels) if i}
    chosen = spread(sorted((i for i in sizes if sizes[i] >= min_size), key=sizes.get), instances)
    if not chosen:
        raise click.ClickException(f"{case}: no lesion of at least {min_size} voxels at {spacing:g} mm")
    sigma = noise_sigma(data, noise)
    rows = []
    for instance_id in chosen:
        box = centred_tile(tuple(data.shape[1:]), labels == instance_id, patch)
        tile, target = data[(slice(None), *box)], torch.as_tensor(labels[box] == instance_id)

        def gradient(draw: torch.Tensor) -> torch.Tensor:
            x = (tile + draw).requires_grad_(True)
            return torch.autograd.grad((network(x[None])[0, 1] * target).sum(), x)[0]

        for name, split in DESIGNS.items():
            error = relative_error_per_sample(gradient, tuple(tile.shape), sigma, split, samples,
                                              torch.Generator().manual_seed(seed + instance_id))
            rows.append({"instance_id": instance_id, "voxels": sizes[instance_id], "design": name,
                         "relative_error_per_sample": error, "samples_for_tol": math.ceil((error / tol) ** 2)})
            click.echo(f"instance {instance_id:>3} ({sizes[instance_id]:>4} voxels) {name:<27} relative error per "
                       f"sample {error:.3f} -> {rows[-1]['samples_for_tol']} samples for {tol:g}")
    table = pd.DataFrame(rows)
    summary = table.groupby("design", sort=False)[["relative_error_per_sample", "samples_for_tol"]].median()
    click.echo(f"\nmedian over {len(chosen)} instances:\n{summary.to_string()}")
    if json_path:
        json_path.write_text(json.dumps({"case": case, "spacing_mm": spacing, "patch": patch, "noise": noise,
                                         "tol": tol, "samples_per_design": samples, "weights": str(weights or ""),
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
