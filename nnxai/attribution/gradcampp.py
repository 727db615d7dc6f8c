"""Instance-level Grad-CAM++ (SPEC section 4) through nnU-Net's sliding window.

The target of an instance is the same as for SmoothGrad (the raw lesion logit of the blended
sliding-window prediction summed over the instance), without noise. A forward hook on the chosen
layer captures its activations A in every tile; the gradients g of the instance's share of the target
in that tile (tile logits x tile weight inside the instance) are taken with respect to them. The
tiles are then put back together the way the logits are: activations are blended with the tiles'
Gaussian weights (each tile's weight over the summed weights, so overlaps average), gradients add up
(each already carries its tile's weight through the target). Mirroring TTA is treated the same way
(activations un-flipped and averaged over flips, gradients summed; each flip forwarded and differentiated
on its own, so one pass's graph is held at a time), and with several folds each fold's map is computed on
its own network and the maps are averaged.

Weights ("monai" variant, MONAI's GradCAMpp, used by the study):
    alpha = g^2 / (2 g^2 + sum_space(A * g^3)),  w_c = sum_space(alpha * relu(g)),  map = relu(sum_c w_c A_c)
"paper" variant (Eq. 19 of Chattopadhay et al., as in pytorch-grad-cam): sum_space(A) * g^3 in the
denominator. MONAI's extra factor exp(score) only rescales a map and would overflow for a summed
logit, so maps are raw (no exp, no epsilon, no min-max) unless `normalize` asks for [0, 1].
Layers below full resolution are blended on their own grid (tile offsets rounded down to whole layer
voxels, exact when they divide by the stride) and the map is upsampled trilinearly to the input.
"""
from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nnxai.attribution.base import Attribution, SaliencyMap
from nnxai.attribution.engine import GradientEngine, bounding_region, local_slices
from nnxai.errors import InputError
from nnxai.nnunet.sliding_window import Slices, SlidingWindow, TileLayout

VARIANTS = ("monai", "paper")
GRADIENT_BUDGET_MB = 2048  # instances' gradient maps held at once without --memory-budget; more go in groups
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class LayerError(InputError, ValueError):
    """A layer name that does not exist or whose output a forward hook cannot use; one line, with the valid names."""


@dataclass(frozen=True)
class LayerInfo:
    """A hookable layer: its name, output channels and stride (input voxels per layer voxel, per axis)."""

    name: str
    channels: int
    stride: tuple[int, ...]


def default_layer(network: nn.Module) -> str:
    """The last decoder stage of an nnU-Net U-Net: full resolution, just before the segmentation head."""
    stages = getattr(getattr(network, "decoder", None), "stages", None)
    if not stages:
        raise LayerError(f"{type(network).__name__} has no decoder.stages; "
                         "choose --layer (list: nnxai layers -m MODEL)")
    return f"decoder.stages.{len(stages) - 1}"


_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def probe_layers(network: nn.Module, patch_size: Sequence[int], in_channels: int) -> dict[str, LayerInfo | str]:
    """Every named module of `network` -> its LayerInfo if a hook can use its output, else the reason why not.

    One forward and backward pass of a patch-sized input tells which outputs are tensors produced once per
    forward pass, left unchanged afterwards (an in-place LeakyReLU after a norm overwrites the norm's
    output) and reaching the logits. Cached per network.
    """
    key = (tuple(patch_size), in_channels)
    cached = _PROBES.setdefault(network, {})
    if key in cached:
        return cached[key]
    modules = [(name, module) for name, module in network.named_modules() if name]
    captured: dict[str, list] = {name: [] for name, _ in modules}

    def recorder(name):
        def hook(_module, _inputs, output):
            captured[name].append((output, output._version if isinstance(output, torch.Tensor) else None))
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules]
    device = next(network.parameters()).device
    probe = torch.randn((1, in_channels, *patch_size), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.enable_grad():
            logits = network(probe.requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    candidates = {}
    results: dict[str, LayerInfo | str] = {}
    for name, calls in captured.items():
        output = calls[0][0] if calls else None
        if not calls:
            results[name] = "it does not run in the network's forward pass"
        elif len(calls) > 1:
            results[name] = f"it runs {len(calls)} times per forward pass"
        elif not isinstance(output, torch.Tensor):
            results[name] = f"its output is a {type(output).__name__}, not a tensor"
        elif output._version != calls[0][1]:
            results[name] = ("its output is modified in place by the next operation (e.g. an in-place LeakyReLU "
                             "after a norm); hook the block's output instead")
        elif not output.requires_grad or output.dim() != probe.dim():
            results[name] = "its output is not a differentiable feature map"
        else:
            candidates[name] = output
    gradients = torch.autograd.grad(logits.sum(), list(candidates.values()), allow_unused=True)
    for (name, output), gradient in zip(candidates.items(), gradients):
        spatial = output.shape[2:]
        if gradient is None:
            results[name] = "its output does not reach the logits"
        elif any(p % s for p, s in zip(patch_size, spatial)):
            results[name] = f"its output grid {tuple(spatial)} does not divide the patch {tuple(patch_size)}"
        else:
            results[name] = LayerInfo(name, int(output.shape[1]), tuple(p // s for p, s in zip(patch_size, spatial)))
    cached[key] = results
    return results


def valid_layers(network: nn.Module, patch_size: Sequence[int], in_channels: int) -> list[LayerInfo]:
    """The layers Grad-CAM++ can use, in the network's module order."""
    return [info for info in probe_layers(network, patch_size, in_channels).values() if isinstance(info, LayerInfo)]


def check_layer(network: nn.Module, name: str, patch_size: Sequence[int], in_channels: int) -> LayerInfo:
    """The LayerInfo of `name`, or a one-line LayerError saying why it cannot be used and listing the valid ones."""
    probed = probe_layers(network, patch_size, in_channels)
    found = probed.get(name)
    if isinstance(found, LayerInfo):
        return found
    valid = ", ".join(info.name for info in valid_layers(network, patch_size, in_channels))
    if found is None:
        raise LayerError(f"unknown layer {name!r}; valid layers: {valid}")
    raise LayerError(f"layer {name!r} cannot be hooked: {found}; valid layers: {valid}")


def gradcampp_weights(activations: torch.Tensor, gradients: torch.Tensor, variant: str = "monai",
                      activation_sums: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM++ channel weights (channels,) from activations and gradients, both (channels, *spatial).

    Where the gradients are zero nothing adds to the sums, so both may be cropped to where the gradients
    live; the "paper" variant then needs the activations' sums over the whole map (`activation_sums`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    spatial = tuple(range(1, activations.dim()))
    squared = gradients.pow(2)
    cubed = squared * gradients
    if variant == "monai":
        denominator = 2 * squared + (activations * cubed).sum(spatial, keepdim=True)
    else:
        sums = activations.sum(spatial) if activation_sums is None else activation_sums
        denominator = 2 * squared + sums.reshape(-1, *[1] * len(spatial)) * cubed
    alpha = squared / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return (alpha * F.relu(gradients)).sum(spatial)


def gradcampp_map(activations: torch.Tensor, gradients: torch.Tensor, variant: str = "monai") -> torch.Tensor:
    """Grad-CAM++ map (*spatial) from a layer's activations and the target's gradients, both (channels, *spatial)."""
    return _weighted_map(activations, gradcampp_weights(activations, gradients, variant))


def _weighted_map(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return F.relu(torch.einsum("c...,c->...", activations, weights))


@dataclass
class _LayerGrid:
    """The chosen layer's grid over the padded volume: where each tile (by index) lands and its blending weight."""

    shape: tuple[int, ...]
    unpadded: Slices
    places: list[Slices]
    weights: list[torch.Tensor]


def _layer_grid(window: SlidingWindow, layout: TileLayout, stride: tuple[int, ...]) -> _LayerGrid:
    """Tiles on the layer's grid (offsets rounded down to whole layer voxels) with the Gaussian averaged over
    each layer voxel, normalized like nnU-Net's so that overlapping tiles' weights sum to one."""
    shape = tuple(-(-p // s) for p, s in zip(layout.padded_shape, stride))
    gaussian = layout.gaussian
    if any(s > 1 for s in stride):
        pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[gaussian.dim()]
        gaussian = pool(gaussian[None, None], stride)[0, 0]
    places = [tuple(slice(t.start // s, t.start // s + g) for t, s, g in zip(tile, stride, gaussian.shape))
              for tile in layout.tiles]
    normalizer = torch.zeros(shape, device=window.device)
    for place in places:
        normalizer[place] += gaussian
    unpadded = tuple(slice(u.start // s, -(-u.stop // s)) for u, s in zip(layout.unpad, stride))
    return _LayerGrid(shape, unpadded, places, [gaussian / normalizer[place] for place in places])


@dataclass(frozen=True)
class GradCAMPlusPlus(Attribution):
    """Instance-level Grad-CAM++ at `layer` (None: the last decoder stage), one map for all input channels; see
    `instance_gradcampp`."""

    name: ClassVar[str] = "gradcampp"
    title: ClassVar[str] = "Grad-CAM++"
    per_channel: ClassVar[bool] = False
    sampled: ClassVar[bool] = False

    layer: str | None = None
    variant: str = "monai"
    normalize: bool = False
    lesion_channel: int = 1

    def attribute(self, window: SlidingWindow, data: torch.Tensor, masks: Mapping[int, np.ndarray],
                  engine: GradientEngine | None = None, progress: bool = False
                  ) -> Iterator[tuple[int, SaliencyMap]]:
        cams = instance_gradcampp(window, data, masks, self.layer, self.variant, self.normalize, self.lesion_channel,
                                  engine, progress)
        for instance_id in list(cams):  # each map leaves this dict as it is handed on
            yield instance_id, SaliencyMap.whole(cams.pop(instance_id)[None])


def instance_gradcampp(
    window: SlidingWindow,
    data: torch.Tensor,
    masks: Mapping[int, np.ndarray],
    layer: str | None = None,
    variant: str = "monai",
    normalize: bool = False,
    lesion_channel: int = 1,
    engine: GradientEngine | None = None,
    progress: bool = False,
) -> dict[int, np.ndarray]:
    """Grad-CAM++ map (*spatial, network space) per instance of a preprocessed (C, *spatial) volume.

    Raw values by default (comparable across instances and cases); `normalize` min-max scales each map
    to [0, 1]. An instance's map depends only on its own mask. Each instance holds a gradient map over the
    tiles it touches; instances whose maps exceed the engine's memory budget (default GRADIENT_BUDGET_MB)
    together are explained in groups, each group repeating the forward passes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    engine = engine or GradientEngine()
    layer = layer or default_layer(window.networks[0])
    info = check_layer(window.networks[0], layer, window.patch_size, data.shape[0])
    layout = window.layout(data.shape[1:])
    grid = _layer_grid(window, layout, info.stride)
    padded = window.pad(data.to(window.device))
    padded_masks = {i: window.padded_mask(m) for i, m in masks.items()}
    unpadded_shape = tuple(u.stop - u.start for u in layout.unpad)
    cams = {i: torch.zeros(unpadded_shape, device=window.device) for i in masks}
    regions = {i: bounding_region([place for tile, place in zip(layout.tiles, grid.places) if bool(mask[tile].any())],
                                  len(grid.shape)) for i, mask in padded_masks.items()}
    budget = (engine.memory_budget_mb or GRADIENT_BUDGET_MB) * 2 ** 20
    for network, group in itertools.product(window.networks, _groups(regions, 4 * info.channels, budget)):
        activations, gradients = _gather(window, network, layout, grid, padded, padded_masks,
                                         {i: regions[i] for i in group}, info, lesion_channel, engine, progress)
        box = activations[(slice(None), *grid.unpadded)]
        sums = box.sum(tuple(range(1, box.dim())))
        for instance_id, (region, gradient) in gradients.items():
            inside = _intersection(region, grid.unpadded)
            # float64 sums: alpha's denominator 2 g^2 + sum(A g^3) can nearly cancel, which float32 amplifies
            weights = gradcampp_weights(_float64(activations[(slice(None), *inside)]),
                                        _float64(gradient[(slice(None), *local_slices(inside, region))]), variant,
                                        _float64(sums))
            cam = _weighted_map(box, weights.to(box.device, box.dtype))
            if cam.shape != unpadded_shape:
                cam = F.interpolate(cam[None, None], size=unpadded_shape, mode=_INTERPOLATION[cam.dim()],
                                    align_corners=False)[0, 0]
            cams[instance_id] += cam / len(window.networks)
    return {instance_id: _normalized(cam).cpu().numpy() if normalize else cam.cpu().numpy()
            for instance_id, cam in cams.items()}


def _groups(regions: Mapping[int, Slices], bytes_per_voxel: int, budget: float) -> list[list[int]]:
    """Instance ids in consecutive groups whose gradient maps fit the budget together (at least one each)."""
    groups: list[list[int]] = [[]]
    used = 0
    for instance_id, region in regions.items():
        size = bytes_per_voxel * math.prod(r.stop - r.start for r in region)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(instance_id)
        used += size
    return groups


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 copy (on the CPU for Apple MPS, which has no float64)."""
    return (tensor.cpu() if tensor.device.type == "mps" else tensor).double()


def _intersection(a: Slices, b: Slices) -> Slices:
    return tuple(slice(max(x.start, y.start), max(min(x.stop, y.stop), max(x.start, y.start))) for x, y in zip(a, b))


def _normalized(cam: torch.Tensor) -> torch.Tensor:
    """Min-max scaling to [0, 1] (all zeros for a constant map)."""
    low, high = cam.min(), cam.max()
    return (cam - low) / (high - low) if high > low else torch.zeros_like(cam)


def _gather(window: SlidingWindow, network: nn.Module, layout: TileLayout, grid: _LayerGrid, padded: torch.Tensor,
            masks: Mapping[int, torch.Tensor], regions: Mapping[int, Slices], info: LayerInfo, lesion_channel: int,
            engine: GradientEngine, progress: bool) -> tuple[torch.Tensor, dict[int, tuple[Slices, torch.Tensor]]]:
    """One network's blended layer activations on the layer grid and, for each instance in `regions`, its
    summed gradients over its region (the box of the tiles it touches): that box and the gradients in it."""
    activations = torch.zeros((info.channels, *grid.shape), device=window.device)
    gradients = {i: (region, torch.zeros((info.channels, *(r.stop - r.start for r in region)), device=window.device))
                 for i, region in regions.items()}
    captured: list[torch.Tensor] = []
    handle = network.get_submodule(info.name).register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        for index, tile in enumerate(tqdm(layout.tiles, desc="Grad-CAM++", unit="tile", disable=not progress,
                                          leave=False)):
            inside = [i for i in regions if bool(masks[i][tile].any())]
            tile_activations, tile_gradients = _tile_activations_and_gradients(
                window, network, padded, layout, tile, [masks[i] for i in inside], captured, lesion_channel, engine)
            placed = grid.places[index]
            activations[(slice(None), *placed)] += grid.weights[index] * tile_activations
            for i, gradient in zip(inside, tile_gradients):
                region, accumulator = gradients[i]
                accumulator[(slice(None), *local_slices(placed, region))] += gradient
    finally:
        handle.remove()
    return activations, gradients


def _tile_activations_and_gradients(window: SlidingWindow, network: nn.Module, padded: torch.Tensor,
                                    layout: TileLayout, tile: Slices, masks: Sequence[torch.Tensor],
                                    captured: list[torch.Tensor], lesion_channel: int,
                                    engine: GradientEngine) -> tuple[torch.Tensor, torch.Tensor | list]:
    """One tile through one network (all its mirrorings): the hooked layer's activations averaged over flips,
    and for each mask the gradient of its share of the target with respect to them, summed over flips.

    Each mirroring is forwarded and differentiated on its own, its graph freed before the next: the target is
    linear in the flips' logits, so memory holds one pass's graph whatever the number of flips."""
    flips = window.tile_flips
    tile_input = padded[(slice(None), *tile)].detach().requires_grad_(bool(masks))
    grad_outputs = torch.stack([m[tile] * layout.tile_weight(tile) for m in masks]) if masks else None
    activations, gradients = [], []
    for axes in flips:
        captured.clear()
        with torch.set_grad_enabled(bool(masks)), engine.forward_pass(window.device):
            logits = window.predict_pass(tile_input, network, axes) / len(flips)
        activations.append(_flip(captured[0][0].detach().float(), axes))
        if masks:
            (gradient,) = engine.gradients(logits[lesion_channel].float(), captured, grad_outputs)
            gradients.append(_flip(gradient[:, 0].float(), tuple(a + 1 for a in axes)))
        del logits
        captured.clear()  # frees the pass's graph
    return sum(activations) / len(flips), sum(gradients) if masks else []


def _flip(tensor: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Mirror `tensor` along `axes` (its own inverse), or return it as it is for no axes."""
    return torch.flip(tensor, axes) if axes else tensor
