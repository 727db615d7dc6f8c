"""The tile-gradient engine under every attribution method: one network pass of one tile at a time.

A tile's logits are the mean over folds and mirrorings, so each such pass is forwarded and differentiated on its
own and the passes' gradients add up: memory stays at one network's graph of one tile plus one batch of gradients.
How the backward passes run (one at a time or batched with `is_grads_batched`, chosen by measurement when asked),
mixed precision, cuDNN's algorithm search and the batch size live in `GradientEngine`; they change how fast the
maps come, not what they are (beyond float rounding, and the documented AMP error).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from nnxai.attribution.input_gradients import input_gradients_only
from nnxai.nnunet.sliding_window import Slices, SlidingWindow, TileLayout

FP16_GRADIENT_SCALE = 2.0 ** 10  # keeps small fp16 gradients from underflowing; divided out afterwards
BACKWARD_MODES = ("auto", "loop", "batched")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CALIBRATION_TARGETS = 2  # "auto" times both backward modes on this many targets (a batch costs a graph per target)
BATCHED_MARGIN = 0.9  # "auto" batches only if that took at most this share of the loop's time: it costs memory


@contextlib.contextmanager
def cudnn_setting(name: str, value: bool) -> Iterator[None]:
    """`torch.backends.cudnn.<name> = value` inside the block, restored after it."""
    previous = getattr(torch.backends.cudnn, name)
    setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        setattr(torch.backends.cudnn, name, previous)


def exact_float32() -> contextlib.AbstractContextManager:
    """Float32 convolutions in full precision on CUDA: cuDNN's TF32 default moved a tile's input gradient by
    12 % (relative L2) on an H100 (benchmarks/tile_precision.py). Low-precision autocast runs are unaffected."""
    return cudnn_setting("allow_tf32", False)


class GradientError(RuntimeError):
    """Gradients that cannot be computed as asked (memory budget too small, fp16 overflow, ...)."""


@dataclass
class GradientEngine:
    """Runs batches of backward passes through one tile's graph.

    `backward`: "loop" (one backward per target, sharing the tile's forward pass), "batched" (one vmapped
    backward per batch, `is_grads_batched`), or "auto" (time both on the first batch of the run; batch only
    if that is at least 10 % faster, as it holds a graph of gradients per target; on a 2-core CPU the loop
    wins, on GPUs batching usually does). `max_batch` bounds the
    targets per batch; `memory_budget_mb` lowers it further from the measured size of one tile's graph.
    `amp`: None (float32), "bf16" or "fp16" autocast of the forward pass (fp16 gradients are scaled).
    `max_maps`: the most instance maps held at once (None: all); see `smoothgrad_maps`.
    `cudnn_search`: let cuDNN time its convolution algorithms per shape and keep the fastest (`cudnn.benchmark`,
    which nnU-Net's predictor turns on too): every tile has one shape, so the search is paid once per process.
    """

    backward: str = "loop"
    max_batch: int = 16
    amp: str | None = None
    memory_budget_mb: float | None = None
    max_maps: int | None = None
    cudnn_search: bool = True
    chosen: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {self.backward!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)} or None, got {self.amp!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_maps is not None and self.max_maps < 1:
            raise ValueError(f"max_maps must be >= 1 or None, got {self.max_maps}")
        if self.backward != "auto":
            self.chosen = self.backward

    @contextlib.contextmanager
    def forward_pass(self, device: torch.device) -> Iterator[None]:
        """The context of a forward pass whose input gradients are taken: mixed precision, or true float32 (no
        TF32) in float32 mode; cuDNN's algorithm search as `cudnn_search` says (`gradients` too); convolutions keep
        only their weights (no weight gradient is ever asked for)."""
        precision = (exact_float32() if self.amp is None
                     else torch.autocast(device_type=device.type, dtype=AMP_DTYPES[self.amp]))
        with precision, cudnn_setting("benchmark", self.cudnn_search), input_gradients_only():
            yield

    def batch_size(self, graph_bytes: int, bytes_per_target: int) -> int:
        """Targets per batch within `memory_budget_mb`, given one tile's graph and each target's buffers."""
        if self.memory_budget_mb is None:
            return self.max_batch
        budget = self.memory_budget_mb * 2 ** 20
        # a batched backward holds about one graph's worth of gradients per target
        per_target = bytes_per_target + (graph_bytes if self.chosen != "loop" else 0)
        fits = int((budget - graph_bytes) // max(per_target, 1))
        if fits < 1:
            needed = (graph_bytes + per_target) / 2 ** 20
            raise GradientError(f"memory budget {self.memory_budget_mb:g} MB is too small for one tile "
                                f"(one tile's graph and one target need about {needed:.0f} MB)")
        return min(self.max_batch, fits)

    def gradients(self, outputs: torch.Tensor, inputs: Sequence[torch.Tensor],
                  grad_outputs: torch.Tensor) -> list[torch.Tensor]:
        """For each input, the stacked (k, *input.shape) gradients of `sum(outputs * grad_outputs[j])`, j < k.

        The tile's graph is retained; it is freed when the caller drops `outputs`.
        """
        scale = FP16_GRADIENT_SCALE if self.amp == "fp16" else 1.0
        grad_outputs = grad_outputs.to(outputs.dtype) * scale if scale != 1.0 else grad_outputs.to(outputs.dtype)
        with exact_float32(), cudnn_setting("benchmark", self.cudnn_search):
            if self.chosen is None and len(grad_outputs) > 1:
                result = self._measure_and_choose(outputs, inputs, grad_outputs)
            elif self.chosen == "batched":
                result = _batched(outputs, inputs, grad_outputs)
            else:
                result = _loop(outputs, inputs, grad_outputs)
        if scale != 1.0:
            result = [g / scale for g in result]
            if not all(bool(torch.isfinite(g).all()) for g in result):
                raise GradientError("fp16 gradients overflowed; use --amp bf16 or float32")
        return result

    def _measure_and_choose(self, outputs, inputs, grad_outputs) -> list[torch.Tensor]:
        """Time the loop and the batched backward on the first targets; keep the faster from now on.

        The first pass (the result) warms up the backward kernels, so neither timed pass pays for that.
        """
        trial, rest = grad_outputs[:CALIBRATION_TARGETS], grad_outputs[CALIBRATION_TARGETS:]
        result = _loop(outputs, inputs, trial)
        for mode, backward in (("batched", _batched), ("loop", _loop)):
            _synchronize(outputs.device)
            start = time.perf_counter()
            try:
                backward(outputs, inputs, trial)
            except RuntimeError as error:
                if mode != "batched" or not _lacks_batching_rule(error):
                    raise  # out of memory, or anything else that would break the run's other passes too
                self.timings[mode] = math.inf
                continue
            _synchronize(outputs.device)
            self.timings[mode] = time.perf_counter() - start
        self.chosen = "batched" if self.timings["batched"] <= BATCHED_MARGIN * self.timings["loop"] else "loop"
        if len(rest):
            remaining = (_batched if self.chosen == "batched" else _loop)(outputs, inputs, rest)
            result = [torch.cat([done, more]) for done, more in zip(result, remaining)]
        return result


def _lacks_batching_rule(error: RuntimeError) -> bool:
    """An operation of the network that vmap, and so a batched backward, cannot run (the loop can)."""
    message = str(error)
    return not isinstance(error, torch.OutOfMemoryError) and ("vmap" in message
                                                               or "batching rule" in message.lower())


def _loop(outputs: torch.Tensor, inputs: Sequence[torch.Tensor], grad_outputs: torch.Tensor) -> list[torch.Tensor]:
    per_target = [torch.autograd.grad(outputs, inputs, g, retain_graph=True) for g in grad_outputs]
    return [torch.stack([grads[i] for grads in per_target]) for i in range(len(inputs))]


def _batched(outputs: torch.Tensor, inputs: Sequence[torch.Tensor], grad_outputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, is_grads_batched=True))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def saved_graph_bytes() -> Iterator[list[int]]:
    """Measure the bytes autograd saves for backward inside the block (one tile's graph), device-independent."""
    total = [0]
    seen = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


class RunningMean:
    """Running mean of per-sample maps and, with `variance`, their variance (Welford) for the standard error.

    Without variance it is a plain sum, which the tiles of a sample may also add into directly
    (`sum_buffer`, then `count_sample`): no per-sample map needs to be held. With `pairs` (antithetic
    sampling), the observations whose variance is estimated are the means of consecutive sample pairs.
    """

    def __init__(self, shape: Sequence[int], device: torch.device, variance: bool = True, pairs: bool = False):
        self.count = 0  # samples
        self.shape = tuple(shape)
        self._total = torch.zeros(self.shape, device=device)  # the mean with variance, else the sum
        self._m2 = torch.zeros(self.shape, device=device) if variance else None
        self._pairs = pairs
        self._first_of_pair: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        return self._total if self._m2 is not None else self._total / max(self.count, 1)

    @property
    def _observations(self) -> int:
        """Observations in the mean: samples, or whole pairs of them."""
        return self.count // 2 if self._pairs else self.count

    @property
    def in_pair(self) -> bool:
        """An antithetic pair is half done: its first sample is not in the mean yet."""
        return self._first_of_pair is not None

    def add(self, sample: torch.Tensor) -> None:
        self.count += 1
        if self._m2 is None:
            self._total += sample
            return
        if self._pairs:
            if self._first_of_pair is None:
                self._first_of_pair = sample
                return
            sample = (self._first_of_pair + sample) / 2
            self._first_of_pair = None
        delta = sample - self._total
        self._total += delta / self._observations
        self._m2 += delta * (sample - self._total)

    def sum_buffer(self) -> torch.Tensor:
        """The running sum itself, for a sample's parts to be added into (without variance only)."""
        if self._m2 is not None:
            raise ValueError("a running mean with variance needs whole samples (add)")
        return self._total

    def count_sample(self) -> None:
        """One more sample has been added into `sum_buffer`."""
        self.count += 1

    def _variance_of_mean(self) -> torch.Tensor:
        return self._m2 / ((self._observations - 1) * self._observations)

    def relative_standard_error(self) -> float:
        """Standard error of the mean map relative to its size (L2 norms): the expected relative L2
        distance to the map of infinitely many samples. NaN with fewer than two observations or without variance."""
        if self._observations < 2 or self._m2 is None:
            return math.nan
        error = float(self._variance_of_mean().sum().sqrt())
        norm = float(self.mean.norm())
        return error / norm if norm > 0 else (0.0 if error == 0 else math.inf)

    def peak_relative_standard_error(self) -> float:
        """Standard error at the voxel of largest mean magnitude, relative to that magnitude."""
        if self._observations < 2 or self._m2 is None:
            return math.nan
        peak = int(self.mean.abs().argmax())
        value = float(self.mean.flatten()[peak].abs())
        error = float(self._variance_of_mean().flatten()[peak].sqrt())
        return error / value if value > 0 else (0.0 if error == 0 else math.inf)

    def converged(self, tol: float) -> bool:
        return self.relative_standard_error() <= tol and self.peak_relative_standard_error() <= tol


def bounding_region(tiles: Sequence[Slices], dims: int) -> Slices:
    """The smallest box holding all `tiles` (an empty box for no tiles)."""
    if not tiles:
        return tuple(slice(0, 0) for _ in range(dims))
    return tuple(slice(min(t[a].start for t in tiles), max(t[a].stop for t in tiles)) for a in range(dims))


def local_slices(tile: Slices, region: Slices) -> Slices:
    """`tile` in the coordinates of a box `region` that contains it."""
    return tuple(slice(t.start - r.start, t.stop - r.start) for t, r in zip(tile, region))


def pass_forward(window: SlidingWindow, padded: torch.Tensor, tile: Slices, network: nn.Module,
                 axes: tuple[int, ...], lesion_channel: int, engine: GradientEngine
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tile's input (a fresh leaf requiring grad) and one pass's share of its float32 lesion logits (unweighted):
    the pass's logits over the number of passes, so that the shares of all passes add up to the tile's logits."""
    tile_input = padded[(slice(None), *tile)].detach().requires_grad_(True)
    with engine.forward_pass(window.device):
        logits = window.predict_pass(tile_input, network, axes)
    return tile_input, logits[lesion_channel].float() / len(window.passes)


def tile_graph_bytes(window: SlidingWindow, padded: torch.Tensor, tile: Slices, lesion_channel: int,
                     engine: GradientEngine) -> int:
    """Bytes of one pass's autograd graph on one tile (all tiles and passes have the same size), measured on `tile`."""
    network, axes = window.passes[0]
    with saved_graph_bytes() as total:
        pass_forward(window, padded, tile, network, axes, lesion_channel, engine)
    return total[0]


@dataclass
class TilePasses:
    """What every gradient pass over the tiles of one volume shares."""

    window: SlidingWindow
    layout: TileLayout
    lesion_channel: int
    engine: GradientEngine
    graph_bytes: int

    def add_gradients(self, padded: torch.Tensor, tile: Slices, batches: Sequence[Sequence],
                      grad_outputs: Callable[[Sequence], torch.Tensor],
                      add: Callable[[Sequence, torch.Tensor], None]) -> None:
        """For each batch, `add(batch, gradients)` once per fold and mirroring pass of `tile`: the gradients
        (k, C, *patch) of the batch's targets `grad_outputs(batch)` through that pass. The passes' gradients sum
        to the tile's; each pass's graph is freed before the next one is built."""
        for network, axes in self.window.passes:
            tile_input, lesion_logits = pass_forward(self.window, padded, tile, network, axes, self.lesion_channel,
                                                     self.engine)
            for batch in batches:
                (gradients,) = self.engine.gradients(lesion_logits, [tile_input], grad_outputs(batch))
                add(batch, gradients)
            del tile_input, lesion_logits  # before the next pass's forward, not after it


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """`items` in consecutive runs of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
