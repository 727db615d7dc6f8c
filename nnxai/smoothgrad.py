"""Instance-level SmoothGrad (SPEC section 3, mean aggregation).

The target of an instance is the raw lesion-class logit of nnU-Net's blended sliding-window
prediction, summed over the instance's voxels. Because blending is linear, that target is a sum over
tiles of `weight_t * tile_logits_t` inside the instance, so its gradient is the sum of per-tile
gradients: we forward one tile, take the gradient of every instance that has voxels in it, free the
tile's graph and go on. Memory stays at one tile's graph, and tiles that touch no instance are skipped.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from nnxai.sliding_window import Slices, SlidingWindow, TileLayout


@dataclass
class _InstanceWork:
    """Padded-space mask of one instance, the tiles it touches and its gradient accumulator over their union."""

    mask: torch.Tensor
    tiles: list[Slices]
    region: Slices
    gradient: torch.Tensor


def noise_generator(seed: int, case: str) -> torch.Generator:
    """Noise stream of one case: depends on the seed and the case name only, not on the run's other cases."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(case.encode()))


def noise_sigma(data: torch.Tensor, noise: float) -> float:
    """SmoothGrad noise level: `noise` x (max - min) of the FLAIR channel (channel 0) of the network input."""
    flair = data[0]
    return float(noise * (flair.max() - flair.min()))


def instance_smoothgrad(
    window: SlidingWindow,
    data: torch.Tensor,
    masks: Mapping[int, np.ndarray],
    samples: int = 50,
    noise: float = 0.05,
    generator: torch.Generator | None = None,
    lesion_channel: int = 1,
    progress: bool = False,
) -> dict[int, np.ndarray]:
    """Mean SmoothGrad map (C, *spatial) per instance of a preprocessed (C, *spatial) volume.

    `masks` maps instance ids to boolean masks in network space. One noise draw per sample serves all
    instances, and each instance's map depends only on its own mask, never on the other instances.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    generator = generator or torch.Generator().manual_seed(0)
    layout = window.layout(data.shape[1:])
    work = _prepare_instances(window, layout, masks, channels=data.shape[0])
    tiles = [tile for tile in layout.tiles if any(tile in w.tiles for w in work.values())]
    sigma = noise_sigma(data, noise)
    with tqdm(total=samples * len(tiles), desc="SmoothGrad", unit="tile", disable=not progress, leave=False) as bar:
        for _ in range(samples):
            noisy = data + torch.randn(data.shape, generator=generator) * sigma if sigma > 0 else data
            padded = window.pad(noisy.to(window.device))
            for tile in tiles:
                _accumulate_tile_gradients(window, layout, padded, tile, work, lesion_channel)
                bar.update()
    return {instance_id: _unpadded_map(w, layout, samples) for instance_id, w in work.items()}


def _prepare_instances(window: SlidingWindow, layout: TileLayout, masks: Mapping[int, np.ndarray],
                       channels: int) -> dict[int, _InstanceWork]:
    work = {}
    for instance_id, mask in masks.items():
        padded_mask = window.pad(torch.as_tensor(np.asarray(mask, dtype=bool))[None].to(window.device))[0]
        tiles = [tile for tile in layout.tiles if bool(padded_mask[tile].any())]
        if tiles:
            region = tuple(slice(min(t[a].start for t in tiles), max(t[a].stop for t in tiles))
                           for a in range(len(layout.padded_shape)))
            shape = [s.stop - s.start for s in region]
        else:
            region, shape = tuple(slice(0, 0) for _ in layout.padded_shape), [0] * len(layout.padded_shape)
        gradient = torch.zeros((channels, *shape), device=window.device)
        work[instance_id] = _InstanceWork(padded_mask, tiles, region, gradient)
    return work


def _accumulate_tile_gradients(window: SlidingWindow, layout: TileLayout, padded: torch.Tensor, tile: Slices,
                               work: Mapping[int, _InstanceWork], lesion_channel: int) -> None:
    """Forward one tile and add, for each instance inside it, the gradient of its share of the target."""
    inside = [w for w in work.values() if tile in w.tiles]
    tile_input = padded[(slice(None), *tile)].detach().requires_grad_(True)
    lesion_logits = window.predict_tile(tile_input)[lesion_channel] * layout.tile_weight(tile)
    for index, w in enumerate(inside):
        target = (lesion_logits * w.mask[tile]).sum()
        (gradient,) = torch.autograd.grad(target, tile_input, retain_graph=index < len(inside) - 1)
        local = tuple(slice(t.start - r.start, t.stop - r.start) for t, r in zip(tile, w.region))
        w.gradient[(slice(None), *local)] += gradient


def _unpadded_map(w: _InstanceWork, layout: TileLayout, samples: int) -> np.ndarray:
    """The instance's mean gradient placed in the unpadded network-space volume."""
    full = torch.zeros((w.gradient.shape[0], *layout.padded_shape))
    if w.tiles:
        full[(slice(None), *w.region)] = w.gradient.cpu()
    return (full[(slice(None), *layout.unpad)] / samples).numpy()
