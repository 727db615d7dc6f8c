"""Instance-level SmoothGrad (SPEC section 3): mean or max aggregation, fixed or convergence-based sampling.

The target of an instance is the raw lesion-class logit of nnU-Net's blended sliding-window
prediction, summed over the instance's voxels ("mean" aggregation) or taken voxel by voxel ("max"
aggregation). Because blending is linear, a target is a sum over tiles of `weight_t * tile_logits_t`,
so its gradient is the sum of per-tile gradients: we forward one tile, take the gradients of every
target that has voxels in it, free the tile's graph and go on. A tile's logits are in turn the mean
over folds and mirrorings, so each such pass is forwarded and differentiated on its own and the passes'
gradients add up. Memory stays at one network's graph of one tile plus one batch of gradients, whatever
the number of folds and mirrorings, and tiles that touch no instance are skipped.

How the backward passes run (one at a time or batched with `is_grads_batched`, chosen by measurement
when asked), mixed precision and the batch size live in `nnxai.attribution.engine`; they change how fast the
maps come, not what they are (beyond float rounding, and the documented AMP error).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm import tqdm

from nnxai.attribution.base import Attribution, SaliencyMap
from nnxai.attribution.engine import (GradientEngine, RunningMean, TilePasses, batches, bounding_region, local_slices,
                                      tile_graph_bytes)
from nnxai.nnunet.sliding_window import Slices, SlidingWindow, TileLayout

AGGREGATIONS = ("mean", "max")


@dataclass(frozen=True)
class Sampling:
    """How many noise samples: a fixed number, or (`samples=None`, "auto") until every map has converged.

    Auto: after at least `min_samples`, an instance stops once the estimated relative standard error of its
    mean map is at most `tol`, both for the map's L2 norm and at its peak (largest magnitude) voxel; at
    most `max_samples` are drawn.

    `antithetic`: every second sample uses the previous sample's noise negated (an antithetic pair). Each
    sample is still Gaussian, so the mean estimates the same SmoothGrad map, and the odd-order terms of the
    gradient's response to the noise cancel within a pair; auto then judges the error by pairs and stops
    only after whole pairs.
    """

    samples: int | None = 50
    tol: float = 0.05
    max_samples: int = 200
    min_samples: int = 5
    antithetic: bool = False

    def __post_init__(self):
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.samples is None and not (self.tol > 0 and 2 <= self.min_samples <= self.max_samples):
            raise ValueError(f"auto sampling needs tol > 0 and 2 <= min_samples <= max_samples, got {self}")
        if self.samples is None and self.antithetic and self.max_samples % 2:
            raise ValueError(f"antithetic auto sampling stops after whole pairs: max_samples must be even, "
                             f"got {self.max_samples}")

    @property
    def limit(self) -> int:
        return self.max_samples if self.samples is None else self.samples


@dataclass
class _InstanceWork:
    """Padded-space mask of one instance, the tiles it touches, their bounding region and its running map."""

    instance_id: int
    mask: torch.Tensor
    tiles: list[Slices]
    region: Slices
    running: RunningMean


def noise_generator(seed: int, case: str) -> torch.Generator:
    """Noise stream of one case: depends on the seed and the case name only, not on the run's other cases."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(case.encode()))


def noise_sigma(data: torch.Tensor, noise: float, channel: int = 0) -> float:
    """SmoothGrad noise level: `noise` x (max - min) of the FLAIR channel (index `channel`) of the network input."""
    flair = data[channel]
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
    results = dict(smoothgrad_maps(window, data, masks, Sampling(samples), noise, generator, lesion_channel,
                                   progress=progress))
    return {instance_id: result.map for instance_id, result in results.items()}


def smoothgrad_maps(
    window: SlidingWindow,
    data: torch.Tensor,
    masks: Mapping[int, np.ndarray],
    sampling: Sampling = Sampling(),
    noise: float = 0.05,
    generator: torch.Generator | None = None,
    lesion_channel: int = 1,
    aggregation: str = "mean",
    engine: GradientEngine | None = None,
    progress: bool = False,
    noise_channel: int = 0,
) -> Iterator[tuple[int, SaliencyMap]]:
    """(instance id, SmoothGrad map with the samples it used and its relative standard error), instance by instance.

    Sample n uses the n-th noise draw of `generator` for every instance, so an instance's map (and, with
    auto sampling, when it stops) depends only on its own mask and the noise stream. Instances are explained
    `engine.max_maps` at a time: a group's maps are yielded (to be written and dropped) before the next group
    starts, which replays the same noise draws; each further group costs one more forward pass per tile and
    sample, and memory holds one group's maps instead of all. The noise sigma is `noise` x the range of channel
    `noise_channel` (FLAIR), for every channel.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    engine = engine or GradientEngine()
    generator = generator or torch.Generator().manual_seed(0)
    start = generator.get_state()
    ids = list(masks)
    size = engine.max_maps or max(len(ids), 1)
    for first in range(0, len(ids), size):
        generator.set_state(start)
        group = {instance_id: masks[instance_id] for instance_id in ids[first:first + size]}
        yield from _group_maps(window, data, group, sampling, noise_sigma(data, noise, noise_channel), generator,
                               lesion_channel, aggregation, engine, progress)


@dataclass(frozen=True)
class SmoothGrad(Attribution):
    """Instance-level SmoothGrad of one case: `noise` x the range of channel `noise_channel` as the noise sigma,
    drawn from the case's own stream (`seed`, `stream`), mean or max aggregation; see `smoothgrad_maps`."""

    name: ClassVar[str] = "smoothgrad"
    title: ClassVar[str] = "SmoothGrad"
    per_channel: ClassVar[bool] = True
    sampled: ClassVar[bool] = True

    sampling: Sampling = Sampling()
    noise: float = 0.05
    seed: int = 0
    stream: str = ""
    lesion_channel: int = 1
    aggregation: str = "mean"
    noise_channel: int = 0

    def attribute(self, window: SlidingWindow, data: torch.Tensor, masks: Mapping[int, np.ndarray],
                  engine: GradientEngine | None = None, progress: bool = False
                  ) -> Iterator[tuple[int, SaliencyMap]]:
        return smoothgrad_maps(window, data, masks, self.sampling, self.noise, noise_generator(self.seed, self.stream),
                               self.lesion_channel, self.aggregation, engine, progress, self.noise_channel)


def _group_maps(window: SlidingWindow, data: torch.Tensor, masks: Mapping[int, np.ndarray], sampling: Sampling,
                sigma: float, generator: torch.Generator, lesion_channel: int, aggregation: str,
                engine: GradientEngine, progress: bool) -> Iterator[tuple[int, SaliencyMap]]:
    """The maps of instances sharing every forward pass."""
    layout = window.layout(data.shape[1:])
    auto = sampling.samples is None
    work = _prepare_instances(window, layout, masks, channels=data.shape[0], variance=auto,
                              pairs=sampling.antithetic)
    # fixed-count mean aggregation adds every tile's gradient straight into the sum (no per-sample map held)
    direct = not auto and aggregation == "mean"
    active = [w for w in work.values() if w.tiles]
    sample_step = _mean_sample if aggregation == "mean" else _max_sample
    graph_bytes = 0
    if engine.memory_budget_mb is not None and active:
        graph_bytes = tile_graph_bytes(window, window.pad(data.to(window.device)), active[0].tiles[0], lesion_channel,
                                       engine)
    tiles = TilePasses(window, layout, lesion_channel, engine, graph_bytes)
    with tqdm(total=sampling.limit, desc=f"SmoothGrad ({aggregation})", unit="sample", disable=not progress,
              leave=False) as bar:
        draw = None
        for index in range(sampling.limit):
            if not active:
                break
            if sigma > 0:
                pair_second = sampling.antithetic and index % 2
                draw = -draw if pair_second else torch.randn(data.shape, generator=generator) * sigma
                noisy = data + draw
            else:
                noisy = data
            padded = window.pad(noisy.to(window.device))
            if direct:
                sample_step(tiles, padded, active, {w.instance_id: w.running.sum_buffer() for w in active})
                for w in active:
                    w.running.count_sample()
            else:
                sample_maps = {w.instance_id: torch.zeros(w.running.shape, device=window.device) for w in active}
                sample_step(tiles, padded, active, sample_maps)
                for w in active:
                    w.running.add(sample_maps[w.instance_id])
            if auto:
                active = [w for w in active if w.running.count < sampling.min_samples or w.running.in_pair
                          or not w.running.converged(sampling.tol)]
            bar.update()
    del active
    for instance_id in list(work):
        yield instance_id, _saliency_map(work.pop(instance_id), layout)


def _prepare_instances(window: SlidingWindow, layout: TileLayout, masks: Mapping[int, np.ndarray],
                       channels: int, variance: bool, pairs: bool) -> dict[int, _InstanceWork]:
    work = {}
    for instance_id, mask in masks.items():
        padded_mask = window.padded_mask(mask)
        tiles = layout.tiles_touching(padded_mask)
        region = bounding_region(tiles, len(layout.padded_shape))
        shape = [channels, *(s.stop - s.start for s in region)]
        running = RunningMean(shape, window.device, variance, pairs)
        work[instance_id] = _InstanceWork(instance_id, padded_mask, tiles, region, running)
    return work


def _mean_sample(tiles: TilePasses, padded: torch.Tensor, active: Sequence[_InstanceWork],
                 sample_maps: dict[int, torch.Tensor]) -> None:
    """One sample of mean aggregation: per tile, the gradient of each inside instance's share of its target.

    Looping, targets go one at a time: the tile's forward pass serves them all anyway, and no batch of
    gradients is held.
    """
    gradient_bytes = 4 * padded.shape[0] * math.prod(tiles.window.patch_size)
    batch_size = tiles.engine.batch_size(tiles.graph_bytes, bytes_per_target=gradient_bytes)
    if tiles.engine.chosen == "loop":
        batch_size = 1
    for tile in tiles.layout.tiles:
        inside = [w for w in active if tile in w.tiles]
        if inside:
            _mean_tile(tiles, padded, tile, inside, batch_size, sample_maps)


def _mean_tile(tiles: TilePasses, padded: torch.Tensor, tile: Slices, inside: Sequence[_InstanceWork], batch_size: int,
               sample_maps: dict[int, torch.Tensor]) -> None:
    """Add each inside instance's gradient through one tile to its sample map."""
    weight = tiles.layout.tile_weight(tile)

    def add(batch: Sequence[_InstanceWork], gradients: torch.Tensor) -> None:
        for w, gradient in zip(batch, gradients):
            sample_maps[w.instance_id][(slice(None), *local_slices(tile, w.region))] += gradient

    tiles.add_gradients(padded, tile, list(batches(inside, batch_size)),
                        lambda batch: torch.stack([w.mask[tile] * weight for w in batch]), add)


def _max_sample(tiles: TilePasses, padded: torch.Tensor, active: Sequence[_InstanceWork],
                sample_maps: dict[int, torch.Tensor]) -> None:
    """One sample of max aggregation: every instance voxel's own gradient (summed over the tiles holding it),
    kept at each input position where its magnitude is the largest over the instance's voxels.

    Voxels are batched with voxels that lie in the same tiles, so a batch's gradient buffer spans only
    those tiles and each tile's forward pass serves the whole batch.
    """
    for members, group in _voxels_by_tiles(tiles.layout, active):
        tile_group = [tile for tile, inside in zip(tiles.layout.tiles, members) if inside]
        region = bounding_region(tile_group, len(tiles.layout.padded_shape))
        buffer_shape = (padded.shape[0], *(s.stop - s.start for s in region))
        batch_size = tiles.engine.batch_size(tiles.graph_bytes, bytes_per_target=4 * math.prod(buffer_shape))
        for batch in batches(group, batch_size):
            buffer = torch.zeros((len(batch), *buffer_shape), device=padded.device)
            for tile in tile_group:
                buffer[(slice(None), slice(None), *local_slices(tile, region))] += _voxel_gradients(
                    tiles, padded, tile, [position for _, position in batch])
            _keep_largest_magnitude(batch, buffer, region, sample_maps)


def _voxel_gradients(tiles: TilePasses, padded: torch.Tensor, tile: Slices,
                     positions: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """Gradients (k, C, *patch) of each voxel's share of its logit in `tile`."""
    weight = tiles.layout.tile_weight(tile)
    grad_outputs = torch.zeros((len(positions), *tiles.window.patch_size), device=padded.device)
    for index, position in enumerate(positions):
        local = tuple(p - t.start for p, t in zip(position, tile))
        grad_outputs[(index, *local)] = weight[local]
    total = torch.zeros((len(positions), padded.shape[0], *tiles.window.patch_size), device=padded.device)

    def add(_batch, gradients: torch.Tensor) -> None:
        total.add_(gradients)

    tiles.add_gradients(padded, tile, [positions], lambda _batch: grad_outputs, add)
    return total


def _voxels_by_tiles(layout: TileLayout, active: Sequence[_InstanceWork]) -> Iterator[tuple[tuple[bool, ...], list]]:
    """The instances' voxels (instance, padded position) grouped by the set of tiles that hold them."""
    starts = torch.tensor([[s.start for s in tile] for tile in layout.tiles])
    stops = torch.tensor([[s.stop for s in tile] for tile in layout.tiles])
    groups: dict[tuple[bool, ...], list] = {}
    for w in active:
        positions = torch.nonzero(w.mask).cpu()
        members = ((positions[:, None] >= starts) & (positions[:, None] < stops)).all(dim=2)
        for position, inside in zip(positions.tolist(), members.tolist()):
            groups.setdefault(tuple(inside), []).append((w, tuple(position)))
    yield from groups.items()


def _keep_largest_magnitude(batch: Sequence, buffer: torch.Tensor, region: Slices,
                            sample_maps: dict[int, torch.Tensor]) -> None:
    """Merge each voxel's gradient into its instance's sample map where its magnitude is larger."""
    for index, (w, _) in enumerate(batch):
        target = sample_maps[w.instance_id][(slice(None), *local_slices(region, w.region))]
        candidate = buffer[index]
        larger = candidate.abs() > target.abs()
        target[larger] = candidate[larger]


def _saliency_map(w: _InstanceWork, layout: TileLayout) -> SaliencyMap:
    """The instance's mean map on the part of its box inside the unpadded network-space volume."""
    starts = [max(r.start, u.start) for r, u in zip(w.region, layout.unpad)]
    region = tuple(slice(start, max(start, min(r.stop, u.stop))) for start, r, u in zip(starts, w.region, layout.unpad))
    local = w.running.mean[(slice(None), *local_slices(region, w.region))].cpu().numpy().copy()
    unpadded = tuple(slice(r.start - u.start, r.stop - u.start) for r, u in zip(region, layout.unpad))
    shape = tuple(u.stop - u.start for u in layout.unpad)
    return SaliencyMap(local, unpadded, shape, w.running.count, w.running.relative_standard_error())
