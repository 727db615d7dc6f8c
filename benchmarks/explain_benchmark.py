"""Cost of instance-level SmoothGrad on a phantom case: the study's way, Captum, and ours (issues 3 and 4).

One command, one case, its ground-truth lesions as the instances (the instance count is known and the
cost does not depend on what the network predicts), a network of the CPU plan's architecture
(nnxai.nnunet.plans: 4 stages, 8-64 features, 2 convolutions per stage) with nnU-Net's He initialization.
Default: phantom_001 of `--cases 12 --seed 0` at 4 mm (22 lesions) with 32^3 patches, which tiles the
head 2 x 2 x 2 as the CPU plan's 64^3 patches tile it at 2 mm (`--spacing 2 --case phantom_002
--patch 64`: 23 lesions, the plan itself, about 8 times the work). It prints seconds (wall and CPU),
peak memory above the start, ratios and the largest map difference of the following (each method's first
call, timed apart as warm-up, is not in its figures):

  mean  (i) the study's way: per sample one graph over the whole sliding window, every instance's
            backward pass through all of it;
        (ii) Captum NoiseTunnel(Saliency) applied instance by instance (same noise draws);
        (iii) ours (nnxai.attribution.smoothgrad: tile by tile, shared forward passes, only touched tiles), on CUDA
              also without cuDNN's algorithm search (which ours turns on and (i) and (ii) leave off, as
              PyTorch does by default);
  max   a per-voxel loop over the whole-window graph versus ours (loop and batched backward) on the
        smallest instances up to --max-voxels voxels;
  auto  --samples auto (independent noise and antithetic pairs) versus a fixed number, all against an
        independent reference of many samples in antithetic pairs,
        on --auto-instances instances spread over the size range;
  amp   ours with bf16/fp16 autocast versus float32 (relative L2 error of the maps).

The default parts (mean, max, amp) finish in a few minutes on 2 CPU cores; `--parts all` adds auto,
which draws hundreds of samples (tens of minutes there). Scale with --samples, --instances, --features,
--max-voxels, --auto-instances, --reference-samples. `benchmarks/gpu_check.sh` runs it at 1 mm on a GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from dataset_conversion.nnunet_raw import dataset_folder_name
from dataset_conversion.phantom import LESION_TABLE, make_phantom_cohort
from nnxai.attribution.engine import GradientEngine, exact_float32, tile_graph_bytes
from nnxai.attribution.smoothgrad import Sampling, noise_sigma, smoothgrad_maps
from nnxai.explain.settings import DEFAULT_MAX_MAPS
from nnxai.lesions.instances import label_components
from nnxai.nnunet.checkpoint import load_checkpoint
from nnxai.nnunet.plans import CPU_FEATURES, CPU_PATCH_SIZE, small_architecture
from nnxai.nnunet.sliding_window import SlidingWindow

PARTS = ("mean", "max", "auto", "amp")
QUICK_PARTS = ("mean", "max", "amp")  # a few minutes on 2 CPU cores; "auto" draws hundreds of samples
NNUNET_UNET_KWARGS = {  # nnU-Net's PlainConvUNet settings; stages, features and kernels come from small_architecture
    "conv_op": "torch.nn.modules.conv.Conv3d", "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


@dataclass
class Measured:
    """What one timed run returned, and its cost."""

    result: object
    seconds: float
    cpu_seconds: float
    peak_mb: float


class _PeakMemory:
    """Peak memory above the start of a block: CUDA allocator statistics, or the process's resident set on CPU
    (sampled every 2 ms from /proc after returning freed heap memory to the system)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - start
            return
        _release_free_heap()
        start = _resident_bytes()
        highest = [start]
        done = threading.Event()

        def sample():
            while not done.wait(0.002):
                highest[0] = max(highest[0], _resident_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.peak = max(highest[0], _resident_bytes()) - start


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def map_large_allocations(threshold: int = 2 ** 20) -> None:
    """Serve CPU allocations from `threshold` bytes up with their own pages (glibc M_MMAP_THRESHOLD), so a freed
    tensor leaves the resident set at once and the sampled peak follows the live tensors, not heap reuse."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def measure(device: torch.device, function: Callable[[], object]) -> Measured:
    """Run `function` once: its result, wall and CPU seconds, and peak memory in MB above the start."""
    memory = _PeakMemory(device)
    with memory.watch():
        start, cpu = time.perf_counter(), time.process_time()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return Measured(result, seconds, cpu_seconds, memory.peak / 2 ** 20)


def tile_sharing_pair(masks: dict, tiles_of: dict) -> list[int]:
    """The two instances of fewest voxels in all that share a tile (else the smallest ones): backward "auto" can
    time its two modes only on a tile that holds two targets."""
    by_size = sorted(masks, key=lambda i: masks[i].sum())
    sharing = [(a, b) for n, a in enumerate(by_size) for b in by_size[n + 1:]
               if any(tile in tiles_of[b] for tile in tiles_of[a])]
    return list(min(sharing, key=lambda p: masks[p[0]].sum() + masks[p[1]].sum())) if sharing else by_size[:2]


def phantom_case(workdir: Path, case: str, cases: int, seed: int,
                 spacing: float) -> tuple[str, torch.Tensor, np.ndarray]:
    """The case (`most`: the one with the most lesions drawn), its network input (FLAIR, T1; cropped to the head and z-scored inside it, as nnU-Net's default
    preprocessing does at the phantom's own spacing) and its lesion components (int32, 0 = background)."""
    cohort = workdir / f"{cases}cases_seed{seed}_{spacing:g}mm"  # reused only for the same cohort
    dataset = cohort / dataset_folder_name(901, "MSPhantom")
    if not (dataset / "dataset.json").is_file():
        make_phantom_cohort(cohort, cases, seed, spacing)
    if case == "most":
        case = pd.read_csv(dataset / LESION_TABLE).case_id.value_counts().idxmax()
    split = "Ts" if (dataset / "imagesTs" / f"{case}_0000.nii.gz").is_file() else "Tr"
    images = np.stack([np.asarray(nib.load(dataset / f"images{split}" / f"{case}_{c:04d}.nii.gz").dataobj, np.float32)
                       for c in range(2)])
    labels = np.asarray(nib.load(dataset / f"labels{split}" / f"{case}.nii.gz").dataobj).astype(np.int16)[None]
    images, labels, _ = crop_to_nonzero(images, labels)
    for channel in range(len(images)):
        images[channel] = ZScoreNormalization(use_mask_for_norm=True, intensityproperties={}).run(images[channel], labels[0])
    return case, torch.from_numpy(np.ascontiguousarray(images)), label_components(labels[0] > 0, connectivity=18)


def cpu_plan_network(features: tuple[int, ...], convs: int, patch: tuple[int, ...], seed: int) -> torch.nn.Module:
    """A PlainConvUNet as nnxai's CPU plans build it (2 input channels, 2 classes), He-initialized by nnU-Net."""
    torch.manual_seed(seed)
    kwargs = small_architecture(NNUNET_UNET_KWARGS, patch, features, convs)
    network = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                     ["conv_op", "norm_op", "dropout_op", "nonlin"], 2, 2, allow_init=True,
                                     deep_supervision=False)
    return network.eval()


def noisy_inputs(data: torch.Tensor, sigma: float, seed: int, samples: int) -> Iterator[torch.Tensor]:
    """The noisy volumes ours draws for (seed, samples): same generator, same order."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        yield data + torch.randn(data.shape, generator=generator) * sigma


def study_mean(window: SlidingWindow, data: torch.Tensor, masks: dict, sigma: float, seed: int,
               samples: int) -> dict[int, np.ndarray]:
    """(i) Per sample one graph over the whole sliding window, each instance's gradient through all of it."""
    totals = {i: torch.zeros(data.shape) for i in masks}
    for noisy in noisy_inputs(data, sigma, seed, samples):
        x = noisy.to(window.device).requires_grad_(True)
        lesion_logits = window.logits(x)[1]
        for index, (instance_id, mask) in enumerate(masks.items()):
            target = (lesion_logits * torch.as_tensor(mask, device=window.device)).sum()
            (gradient,) = torch.autograd.grad(target, x, retain_graph=index < len(masks) - 1)
            totals[instance_id] += gradient.cpu()
    return {i: (total / samples).numpy() for i, total in totals.items()}


def captum_mean(window: SlidingWindow, data: torch.Tensor, masks: dict, sigma: float, seed: int,
                samples: int) -> dict[int, np.ndarray]:
    """(ii) Captum's NoiseTunnel(Saliency) per instance; reseeded per instance so that it draws ours' noise (on the
    CPU, where ours draws it: the input stays there and the target moves it to the window's device)."""
    from captum.attr import NoiseTunnel, Saliency

    maps = {}
    for instance_id, mask in masks.items():
        mask_tensor = torch.as_tensor(mask, device=window.device)

        def target(batch: torch.Tensor) -> torch.Tensor:
            return torch.stack([(window.logits(x.to(window.device))[1] * mask_tensor).sum() for x in batch])

        torch.manual_seed(seed)
        attribution = NoiseTunnel(Saliency(target)).attribute(
            data[None], nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=1,
            stdevs=sigma, abs=False)
        maps[instance_id] = attribution[0].detach().cpu().numpy()
    return maps


def ours(window: SlidingWindow, data: torch.Tensor, masks: dict, sampling: Sampling, noise: float, seed: int,
         engine: GradientEngine, aggregation: str = "mean") -> dict:
    return dict(smoothgrad_maps(window, data, masks, sampling, noise, torch.Generator().manual_seed(seed),
                                aggregation=aggregation, engine=engine))


def ours_streamed(window: SlidingWindow, data: torch.Tensor, masks: dict, sampling: Sampling, noise: float,
                  seed: int, engine: GradientEngine, reference: dict) -> float:
    """Ours as `nnxai explain` runs it: each map is used (here compared with `reference`) and dropped as its
    group finishes; the largest relative difference."""
    largest = 0.0
    for instance_id, result in smoothgrad_maps(window, data, masks, sampling, noise,
                                               torch.Generator().manual_seed(seed), engine=engine):
        largest = max(largest, largest_difference({instance_id: result}, {instance_id: reference[instance_id]}))
    return largest


def study_max(window: SlidingWindow, data: torch.Tensor, masks: dict, sigma: float, seed: int,
              samples: int) -> dict[int, np.ndarray]:
    """The per-voxel loop: the whole-window graph per sample and one backward pass per instance voxel."""
    totals = {i: torch.zeros(data.shape) for i in masks}
    for noisy in noisy_inputs(data, sigma, seed, samples):
        x = noisy.to(window.device).requires_grad_(True)
        lesion_logits = window.logits(x)[1]
        for instance_id, mask in masks.items():
            largest = torch.zeros(data.shape, device=window.device)
            for voxel in np.argwhere(mask):
                (gradient,) = torch.autograd.grad(lesion_logits[tuple(voxel)], x, retain_graph=True)
                replace = gradient.abs() > largest.abs()
                largest[replace] = gradient[replace]
            totals[instance_id] += largest.cpu()
    return {i: (total / samples).numpy() for i, total in totals.items()}


def largest_difference(maps: dict, reference: dict) -> float:
    """Largest |difference| over all instances, relative to each reference map's largest magnitude."""
    return max(float(np.abs(_array(maps[i]) - _array(reference[i])).max() / np.abs(_array(reference[i])).max())
               for i in reference)


def relative_l2(map_: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(map_ - reference) / np.linalg.norm(reference))


def _array(value) -> np.ndarray:
    return value.map if hasattr(value, "map") else value


def spread(values: list[int], count: int) -> list[int]:
    """`count` entries of `values` evenly spread over its order (all of them if count >= len)."""
    if count >= len(values):
        return list(values)
    return [values[round(k * (len(values) - 1) / (count - 1))] for k in range(count)] if count > 1 else [values[0]]


class Report:
    """Printed lines and the JSON record of one benchmark run."""

    def __init__(self):
        self.record: dict = {}

    def line(self, text: str = "") -> None:
        click.echo(text)

    def warm_up(self, name: str, device: torch.device, function: Callable[[], object]) -> None:
        """Run and record (seconds) an untimed first call, so that what a long run pays once (CUDA kernel loading,
        cuDNN's algorithm search per shape and precision) stays out of the timings that follow."""
        self.record.setdefault("setup", {}).setdefault("warm_up_seconds", {})[name] = measure(device, function).seconds

    def timed(self, part: str, name: str, measured: Measured, **extra) -> None:
        self.record.setdefault(part, {})[name] = {"seconds": measured.seconds, "cpu_seconds": measured.cpu_seconds,
                                                 "peak_mb": measured.peak_mb, **extra}
        details = "".join(f", {k} {v:.3g}" if isinstance(v, float) else f", {k} {v}" for k, v in extra.items())
        self.line(f"  {name:<34} {measured.seconds:9.1f} s wall {measured.cpu_seconds:9.1f} s CPU "
                  f"{measured.peak_mb:9.0f} MB peak{details}")


def run_benchmark(workdir: Path, case: str, cases: int, seed: int, spacing: float, instances: int,
                  features: tuple[int, ...],
                  convs: int, patch: int, device: str, threads: int, tta: bool, folds: int, samples: int,
                  noise: float,
                  parts: tuple[str, ...], backward: str, max_voxels: int, auto_instances: int, tol: float,
                  max_samples: int, fixed_samples: int, reference_samples: int, amp: tuple[str, ...],
                  ours_amp: str | None = None, weights: Path | None = None, max_maps: int | None = DEFAULT_MAX_MAPS
                  ) -> dict:
    torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cpu":
        map_large_allocations()
    report = Report()
    case, data, labels = phantom_case(workdir, case, cases, seed, spacing)
    masks = {int(i): labels == i for i in np.unique(labels) if i}
    if instances:
        masks = dict(list(masks.items())[:instances])
    if not masks:
        raise click.ClickException(f"{case}: no lesions at {spacing:g} mm; choose another --case")
    networks = [cpu_plan_network(features, convs, (patch,) * 3, seed + fold) for fold in range(folds)]
    if weights is not None:
        try:
            networks[0].load_state_dict(load_checkpoint(weights)["network_weights"])
        except RuntimeError as error:
            raise click.ClickException(f"{weights}: weights of another architecture than --features/--convs "
                                       f"({str(error).splitlines()[0]})") from None
    window = SlidingWindow([network.to(device) for network in networks], (patch,) * 3,
                           mirror_axes=(0, 1, 2) if tta else None, device=device)
    layout = window.layout(data.shape[1:])
    tiles_of = {i: layout.tiles_touching(window.padded_mask(m)) for i, m in masks.items()}
    tiles_per_instance = [len(tiles) for tiles in tiles_of.values()]
    sigma = noise_sigma(data, noise)
    graph_bytes = tile_graph_bytes(window, window.pad(data.to(device)), layout.tiles[0], 1, GradientEngine())
    report.record["setup"] = {
        "case": case, "spacing_mm": spacing, "network_shape": list(data.shape[1:]), "instances": len(masks),
        "instance_voxels": sorted(int(m.sum()) for m in masks.values()), "tiles": len(layout.tiles),
        "mean_tiles_per_instance": float(np.mean(tiles_per_instance)), "patch": patch, "features": list(features),
        "convs_per_stage": convs, "weights": str(weights) if weights else "He initialization", "tta": tta,
        "folds": folds,
        "device": str(device), "threads": threads, "noise": noise,
        "tile_graph_mb": graph_bytes / 2 ** 20, "torch": torch.__version__, "python": platform.python_version(),
        "processor": platform.processor() or platform.machine()}
    report.line(f"{case}: network input {tuple(data.shape[1:])} at {spacing:g} mm, {len(masks)} instances, "
                f"{len(layout.tiles)} tiles of {patch}^3, {np.mean(tiles_per_instance):.2f} tiles per instance "
                f"on average; one pass's graph {graph_bytes / 2 ** 20:.0f} MB; {device}, {threads} thread(s), "
                f"{folds} fold(s), TTA {'on' if tta else 'off'}")
    engine = GradientEngine(backward, max_batch=16, max_maps=max_maps)
    pair = {i: masks[i] for i in tile_sharing_pair(masks, tiles_of)}
    if "mean" in parts or "max" in parts:  # the whole-window graph is only built by these parts
        report.warm_up("(i) study", device, lambda: study_mean(window, data, pair, sigma, seed, 1))
    # the backward mode, if "auto", is measured here, once per run, as `nnxai explain` does
    report.warm_up("ours", device, lambda: ours(window, data, pair, Sampling(1), noise, seed, engine))
    if backward == "auto":
        report.record["setup"]["backward_seconds"] = dict(engine.timings)
        report.line(f"backward mode by measurement: {engine.chosen} "
                    f"({', '.join(f'{k} {v:.3f} s' for k, v in engine.timings.items())} for two targets)"
                    if engine.chosen else "backward mode: not measured (no tile holds two instances), the loop runs")
    if "mean" in parts:
        _mean_part(report, window, data, masks, sigma, noise, seed, samples, engine, device, ours_amp)
    if "max" in parts:
        _max_part(report, window, data, masks, sigma, noise, seed, samples, backward, max_voxels, device)
    if "auto" in parts:
        _auto_part(report, window, data, masks, noise, seed, engine, auto_instances, tol, max_samples,
                   fixed_samples, reference_samples, device)
    if "amp" in parts:
        _amp_part(report, window, data, masks, noise, seed, samples, amp, device)
    return report.record


def _mean_part(report, window, data, masks, sigma, noise, seed, samples, engine, device, ours_amp) -> None:
    report.line(f"\nmean aggregation, {samples} sample(s), {len(masks)} instances:")
    study = measure(device, lambda: study_mean(window, data, masks, sigma, seed, samples))
    report.timed("mean", "(i) study: whole-window graph", study)
    one = dict(list(masks.items())[:1])
    report.warm_up("(ii) Captum", device, lambda: captum_mean(window, data, one, sigma, seed, 1))
    captum = measure(device, lambda: captum_mean(window, data, masks, sigma, seed, samples))
    report.timed("mean", "(ii) Captum NoiseTunnel(Saliency)", captum,
                 max_rel_difference=largest_difference(captum.result, study.result))
    mine = measure(device, lambda: ours_streamed(window, data, masks, Sampling(samples), noise, seed, engine,
                                                 study.result))
    report.timed("mean", f"(iii) ours (backward {engine.chosen}, {engine.max_maps or 'all'} maps at a time)", mine,
                 max_rel_difference=mine.result)
    if device.type == "cuda":  # the search only exists in cuDNN
        plain = GradientEngine(engine.chosen, engine.max_batch, max_maps=engine.max_maps, cudnn_search=False)
        report.warm_up("ours, search off", device, lambda: ours(window, data, one, Sampling(1), noise, seed, plain))
        no_search = measure(device, lambda: ours_streamed(window, data, masks, Sampling(samples), noise, seed, plain,
                                                          study.result))
        report.timed("mean", "(iii) ours, cuDNN algorithm search off", no_search, max_rel_difference=no_search.result,
                     study_over_ours_seconds=study.seconds / no_search.seconds)
    ratios = {"study_over_ours_seconds": study.seconds / mine.seconds,
              "captum_over_ours_seconds": captum.seconds / mine.seconds,
              "ours_over_study_peak_memory": mine.peak_mb / study.peak_mb,
              "seconds_per_instance_per_sample": mine.seconds / (len(masks) * samples)}
    if ours_amp:
        amp_engine = GradientEngine(engine.chosen, engine.max_batch, amp=ours_amp)
        report.warm_up(ours_amp, device, lambda: ours(window, data, one, Sampling(1), noise, seed, amp_engine))
        mixed = measure(device, lambda: ours(window, data, masks, Sampling(samples), noise, seed, amp_engine))
        report.timed("mean", f"(iv) ours, {ours_amp} autocast", mixed,
                     max_rel_difference=largest_difference(mixed.result, study.result))
        ratios["study_over_ours_amp_seconds"] = study.seconds / mixed.seconds
    report.record["mean"]["ratios"] = ratios
    report.line(f"  ours is {ratios['study_over_ours_seconds']:.2f}x as fast as (i) and "
                f"{ratios['captum_over_ours_seconds']:.2f}x as fast as (ii); peak memory "
                f"{ratios['ours_over_study_peak_memory']:.2f} of (i); "
                f"{ratios['seconds_per_instance_per_sample']:.2f} s per instance and sample")


def _max_part(report, window, data, masks, sigma, noise, seed, samples, backward, max_voxels, device) -> None:
    chosen, voxels = {}, 0
    for instance_id in sorted(masks, key=lambda i: masks[i].sum()):
        if chosen and voxels + masks[instance_id].sum() > max_voxels:
            break
        chosen[instance_id] = masks[instance_id]
        voxels += int(masks[instance_id].sum())
    report.line(f"\nmax aggregation, {samples} sample(s), {len(chosen)} smallest instances, {voxels} voxels:")
    loop = measure(device, lambda: study_max(window, data, chosen, sigma, seed, samples))
    report.timed("max", "per-voxel loop, whole-window graph", loop)
    for mode in ("loop", "batched"):
        engine = GradientEngine(mode, max_batch=16)
        run = measure(device, lambda: ours(window, data, chosen, Sampling(samples), noise, seed, engine, "max"))
        report.timed("max", f"ours, {mode} backward (batch 16)", run,
                     max_rel_difference=largest_difference(run.result, loop.result),
                     loop_over_ours_seconds=loop.seconds / run.seconds)
    report.record["max"]["voxels"] = voxels


def _auto_part(report, window, data, masks, noise, seed, engine, auto_instances, tol, max_samples, fixed_samples,
               reference_samples, device) -> None:
    by_size = sorted(masks, key=lambda i: masks[i].sum())
    chosen = {i: masks[i] for i in spread(by_size, auto_instances)}
    report.line(f"\n--samples auto (tol {tol}, at most {max_samples}) versus {fixed_samples} samples, "
                f"{len(chosen)} instances, against {reference_samples} antithetic samples of other noise:")
    reference = measure(device, lambda: ours(window, data, chosen, Sampling(reference_samples, antithetic=True),
                                             noise, seed + 1, engine))
    report.timed("auto", f"reference, {reference_samples} samples in antithetic pairs", reference)
    runs = {"auto, independent noise": Sampling(None, tol, max_samples),
            "auto, antithetic pairs": Sampling(None, tol, max_samples, antithetic=True),
            f"fixed {fixed_samples}, independent noise": Sampling(fixed_samples)}
    per_instance = {i: {"instance_id": i, "voxels": int(chosen[i].sum())} for i in chosen}
    for name, sampling in runs.items():
        run = measure(device, lambda: ours(window, data, chosen, sampling, noise, seed, engine))
        errors = {i: relative_l2(run.result[i].map, reference.result[i].map) for i in chosen}
        used = [run.result[i].samples for i in chosen]
        report.timed("auto", name, run, median_samples=float(statistics.median(used)),
                     median_rel_l2_to_reference=float(statistics.median(errors.values())))
        for i in chosen:
            per_instance[i][name] = {"samples": run.result[i].samples, "rel_l2": errors[i],
                                     "rel_std_error": run.result[i].relative_standard_error}
    report.record["auto"]["per_instance"] = list(per_instance.values())
    for row in per_instance.values():
        report.line(f"    instance {row['instance_id']:>3} ({row['voxels']:>4} voxels): " + "; ".join(
            f"{name} {row[name]['samples']} samples, rel. L2 {row[name]['rel_l2']:.3f}" for name in runs))


def _amp_part(report, window, data, masks, noise, seed, samples, amp, device) -> None:
    report.line(f"\nmixed precision versus float32, {samples} sample(s), {len(masks)} instances:")
    reference = measure(device, lambda: ours(window, data, masks, Sampling(samples), noise, seed,
                                             GradientEngine("loop")))
    report.timed("amp", "float32", reference, seconds_per_instance=reference.seconds / len(masks))
    for dtype in amp:
        engine = GradientEngine("loop", amp=dtype)
        report.warm_up(dtype, device, lambda: ours(window, data, dict(list(masks.items())[:1]), Sampling(1), noise,
                                                     seed, engine))
        run = measure(device, lambda: ours(window, data, masks, Sampling(samples), noise, seed, engine))
        errors = [relative_l2(run.result[i].map, reference.result[i].map) for i in masks]
        report.timed("amp", dtype, run, median_rel_l2=float(statistics.median(errors)), max_rel_l2=max(errors),
                     float32_over_amp_seconds=reference.seconds / run.seconds,
                     seconds_per_instance=run.seconds / len(masks))


def integers(text: str) -> tuple[int, ...]:
    """"32,64,128" -> (32, 64, 128), for comma-separated options."""
    return tuple(int(v) for v in text.split(","))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/nnxai-benchmark"), show_default=True,
              help="Where phantom cohorts are written (each reused when present).")
@click.option("--case", default="phantom_001", show_default=True,
              help="Phantom case id, or 'most' for the case with the most lesions.")
@click.option("--cases", default=12, show_default=True, help="Phantom cohort size (case ids depend on it).")
@click.option("--seed", default=0, show_default=True, help="Phantom, network and noise seed.")
@click.option("--spacing", default=4.0, show_default=True, help="Phantom voxel size in mm.")
@click.option("--instances", default=0, show_default=True, help="Explain only the first N lesions (0: all).")
@click.option("--features", default=",".join(map(str, CPU_FEATURES)), show_default=True,
              help="Features per stage (comma separated).")
@click.option("--convs", default=2, show_default=True, help="Convolutions per stage.")
@click.option("--patch", default=32, show_default=True,
              help=f"Cubic patch size (the CPU plan's is {CPU_PATCH_SIZE[0]}, for 2 mm).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--threads", default=1, show_default=True,
              help="torch CPU threads (on shared cores one thread is often the fastest).")
@click.option("--tta/--no-tta", default=False, show_default=True, help="Mirroring test-time augmentation.")
@click.option("--folds", default=1, show_default=True,
              help="Networks averaged as a fold ensemble (each He-initialized with its own seed).")
@click.option("--samples", default=1, show_default=True,
              help="Noise samples for the mean, max and amp parts (costs are per sample).")
@click.option("--noise", default=0.05, show_default=True)
@click.option("--parts", default=",".join(QUICK_PARTS), show_default=True,
              help=f"Comparisons to run, of {', '.join(PARTS)}, or 'all'.")
@click.option("--backward", type=click.Choice(["auto", "loop", "batched"]), default="auto", show_default=True,
              help="Backward mode of ours in the mean and auto parts (max runs both).")
@click.option("--max-voxels", default=12, show_default=True, help="Instance voxels in the max comparison.")
@click.option("--auto-instances", default=2, show_default=True, help="Instances in the auto comparison.")
@click.option("--tol", default=0.05, show_default=True)
@click.option("--max-samples", default=200, show_default=True)
@click.option("--fixed-samples", default=50, show_default=True)
@click.option("--reference-samples", default=200, show_default=True)
@click.option("--amp", default="bf16,fp16", show_default=True, help="Autocast types compared with float32.")
@click.option("--ours-amp", type=click.Choice(["bf16", "fp16"]),
              help="Also time ours with this autocast in the mean part (for GPUs).")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="nnU-Net checkpoint of a network with these --features/--convs (default: untrained).")
@click.option("--max-maps", default=DEFAULT_MAX_MAPS, show_default=True,
              help="SmoothGrad maps ours holds at once in the mean part, as `nnxai explain --max-maps` (0: all).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the figures as JSON.")
def main(workdir, case, cases, seed, spacing, instances, features, convs, patch, device, threads, tta, folds, samples,
         noise, parts,
         backward, max_voxels, auto_instances, tol, max_samples, fixed_samples, reference_samples, amp, ours_amp,
         weights, max_maps, json_path) -> None:
    """Time instance-level SmoothGrad the study's way, with Captum and ours on one phantom case.

    Float32 is true float32 for every method (no TF32 on CUDA), as ours always computes it.
    """
    selected = PARTS if parts == "all" else tuple(p for p in parts.split(",") if p)
    unknown = [p for p in selected if p not in PARTS]
    if unknown:
        raise click.BadParameter(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}", param_hint="--parts")
    with exact_float32():
        record = run_benchmark(workdir, case, cases, seed, spacing, instances, integers(features), convs, patch,
                               device, threads, tta, folds, samples, noise, selected, backward, max_voxels,
                               auto_instances, tol, max_samples, fixed_samples, reference_samples,
                               tuple(a for a in amp.split(",") if a),
                               ours_amp, weights, max_maps or None)
    if json_path:
        json_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
