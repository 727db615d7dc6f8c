"""A differentiable copy of nnU-Net's sliding-window prediction.

nnU-Net predicts under `torch.inference_mode`, so no gradient can flow through it. This module
reproduces its arithmetic (same padding, tiles, Gaussian importance weights, mirroring TTA and fold
ensembling) with plain autograd-friendly operations, accumulating in float32 where nnU-Net uses
float16, and exposes the per-tile pieces so that gradients can be taken one tile at a time.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from torch import nn

Slices = tuple[slice, ...]


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one volume lie and how their predictions are blended.

    `weight_per_tile` is nnU-Net's Gaussian divided by the summed Gaussians under that tile, so the
    blended logits are `sum_t weight_t * tile_logits_t` placed at each tile.
    """

    padded_shape: tuple[int, ...]
    unpad: Slices
    tiles: list[Slices]
    gaussian: torch.Tensor
    normalizer: torch.Tensor

    def tile_weight(self, tile: Slices) -> torch.Tensor:
        """Blending weight of each voxel of `tile` in the final logits."""
        return self.gaussian / self.normalizer[tile]

    def tiles_touching(self, padded_mask: torch.Tensor) -> list[Slices]:
        """The tiles holding any voxel of a mask on the padded grid (see `SlidingWindow.padded_mask`)."""
        return [tile for tile in self.tiles if bool(padded_mask[tile].any())]


class SlidingWindow:
    """nnU-Net's sliding-window logits for a list of fold networks, differentiable with respect to the input."""

    def __init__(
        self,
        networks: Sequence[nn.Module],
        patch_size: Sequence[int],
        step_size: float = 0.5,
        mirror_axes: Sequence[int] | None = None,
        use_gaussian: bool = True,
        device: torch.device | str = "cpu",
    ):
        self.networks = list(networks)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.step_size = step_size
        self.mirror_axes = tuple(mirror_axes) if mirror_axes else ()
        self.use_gaussian = use_gaussian
        self.device = torch.device(device)

    def layout(self, image_shape: Sequence[int]) -> TileLayout:
        """Tiles and blending weights for an (unpadded) spatial shape, as nnU-Net computes them."""
        padded_shape = tuple(max(s, p) for s, p in zip(image_shape, self.patch_size))
        _, unpad = pad_nd_image(torch.empty((1, *image_shape)), self.patch_size, "constant", {"value": 0}, True)
        steps = compute_steps_for_sliding_window(padded_shape, self.patch_size, self.step_size)
        tiles = [
            tuple(slice(start, start + size) for start, size in zip(corner, self.patch_size))
            for corner in itertools.product(*steps)
        ]
        if self.use_gaussian:
            # nnU-Net builds its Gaussian in float16; keep those exact values, then blend in float32.
            gaussian = compute_gaussian(self.patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10,
                                        dtype=torch.float16, device=self.device).float()
        else:
            gaussian = torch.ones(self.patch_size, device=self.device)
        normalizer = torch.zeros(padded_shape, device=self.device)
        for tile in tiles:
            normalizer[tile] += gaussian
        return TileLayout(padded_shape, tuple(unpad[1:]), tiles, gaussian, normalizer)

    def pad(self, data: torch.Tensor) -> torch.Tensor:
        """Zero-pad a (C, *spatial) volume to at least the patch size, centred, as nnU-Net does."""
        return pad_nd_image(data, self.patch_size, "constant", {"value": 0}, False)

    def padded_mask(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A (*spatial) mask as a boolean tensor on the padded grid, on this window's device."""
        return self.pad(torch.as_tensor(np.asarray(mask, dtype=bool))[None].to(self.device))[0]

    @property
    def tile_flips(self) -> list[tuple[int, ...]]:
        """The mirrorings TTA averages over (no flip first), as axes of a (C, *patch) tile or its logits."""
        axes = [axis + 1 for axis in self.mirror_axes]
        return [()] + [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]

    @property
    def passes(self) -> list[tuple[nn.Module, tuple[int, ...]]]:
        """Every (fold network, mirroring) whose logits a tile's prediction averages, in nnU-Net's order."""
        return [(network, axes) for network in self.networks for axes in self.tile_flips]

    @staticmethod
    def predict_pass(tile_input: torch.Tensor, network: nn.Module, axes: tuple[int, ...]) -> torch.Tensor:
        """Logits (K, *patch) of one (C, *patch) tile through one network, mirrored along `axes` and back."""
        flipped = torch.flip(tile_input, axes) if axes else tile_input
        out = network(flipped[None])[0]
        return torch.flip(out, axes) if axes else out

    def predict_tile(self, tile_input: torch.Tensor) -> torch.Tensor:
        """Logits (K, *patch) of one (C, *patch) tile: mean over folds and over all mirrorings."""
        passes = self.passes
        total = None
        for network, axes in passes:
            out = self.predict_pass(tile_input, network, axes)
            total = out if total is None else total + out
        return total / len(passes)

    def blended_tiles(self, padded: torch.Tensor, layout: TileLayout, tiles: Sequence[Slices] | None = None,
                      cache: dict | None = None) -> Iterator[tuple[Slices, torch.Tensor]]:
        """Yield (tile, weighted tile logits) for the given tiles (default: all), in nnU-Net's order.

        With `cache` (for one input volume), each tile is predicted once and kept there for later calls.
        """
        for tile in layout.tiles if tiles is None else tiles:
            key = tuple((s.start, s.stop) for s in tile)
            weighted = None if cache is None else cache.get(key)
            if weighted is None:
                weighted = self.predict_tile(padded[(slice(None), *tile)]) * layout.tile_weight(tile)
                if cache is not None:
                    cache[key] = weighted
            yield tile, weighted

    def logits(self, data: torch.Tensor, tiles: Sequence[Slices] | None = None, layout: TileLayout | None = None,
               cache: dict | None = None) -> torch.Tensor:
        """Blended logits (K, *spatial) of a preprocessed (C, *spatial) volume; differentiable in `data`.

        With `tiles`, only those are run: the result equals the full prediction wherever every tile covering a
        voxel is among them and is partial elsewhere. `cache`: see `blended_tiles`.
        """
        layout = layout or self.layout(data.shape[1:])
        padded = self.pad(data.to(self.device))
        blended = None
        for tile, weighted in self.blended_tiles(padded, layout, tiles, cache):
            if blended is None:
                blended = torch.zeros((weighted.shape[0], *layout.padded_shape), dtype=weighted.dtype, device=self.device)
            blended[(slice(None), *tile)] += weighted
        if blended is None:
            raise ValueError("need at least one tile")
        return blended[(slice(None), *layout.unpad)]

