"""Model-randomization sanity check (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018).

A map that explains the model must change when the model's learned weights are destroyed. The network's
parameterized layers are grouped into blocks (a block is a module path up to its first index, such as
`decoder.seg_layers.0`, `decoder.stages.1`, `decoder.transpconvs.1` or `encoder.stages.3`), ordered by
when they run in a forward pass. Two experiments re-explain the selected instances:

- cascading: randomize the blocks one after another from the output back to the input, keeping the
  earlier ones random, so the last step has every learned weight replaced;
- independent: randomize one block at a time, the others keeping their trained weights.

A block is re-initialized as nnU-Net initializes a new network (He-normal convolutions with zero bias,
identity normalization), from a seed fixed per block, so a block gets the same random weights in both
experiments and in every fold. Every map is recomputed with the run's settings and the same noise draws
as the original map, so only the weights differ. Original and randomized maps are compared inside the
instance's box (its bounding box grown by a margin) by Spearman rank correlation and SSIM, both of the
absolute maps (Adebayo's main measure) and of the signed maps. A randomized map that is constant has no
ranking to compare: it is counted apart, and a method whose randomized maps are mostly constant gets the
verdict "constant", not a pass.
"""
from __future__ import annotations

import copy
import functools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from nnunetv2.utilities.network_initialization import InitWeights_He
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn
from tqdm import tqdm

from nnxai.explain.output import method_channels
from nnxai.explain.reopen import CaseInput, ReopenedRun
from nnxai.nnunet.sliding_window import Slices
from nnxai.sanity.common import InstanceSelection, SanityError, instance_box, recompute_maps, write_outputs

CASCADING, INDEPENDENT, REFERENCE = "cascading", "independent", "reference"
STATISTICS = ("spearman_abs", "spearman_signed", "ssim_abs", "ssim_signed")
COLUMNS = ["case", "instance_id", "group", "method", "channel", "experiment", "step", "layer", *STATISTICS,
           "randomized_constant"]
VERDICT_COLUMNS = ["method", "channel", "statistic", "instances", "threshold", "verdict", "constant_maps",
                   *(f"median_abs_{s}" for s in STATISTICS), *(f"reference_median_abs_{s}" for s in STATISTICS)]
_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


@dataclass(frozen=True)
class Step:
    """One re-explanation: which blocks are random, and the block this step adds (cascading) or tests alone."""

    experiment: str
    step: int
    layer: str
    randomized: tuple[str, ...]


def block_name(module_name: str) -> str:
    """The block a module belongs to: its path up to and including the first numeric index (else the path)."""
    match = _BLOCK.match(module_name)
    return match.group(1) if match else module_name


def _parameterized_modules(network: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in network.named_modules()
            if name and any(True for _ in module.parameters(recurse=False))}


def randomizable_blocks(network: nn.Module, input_shape: Sequence[int], layers: Sequence[str] = ()) -> list[str]:
    """Blocks of parameterized layers that take part in a forward pass, from the output back to the input.

    The order comes from running the network once on zeros of `input_shape` (C, *patch): a block's
    position is the first time one of its layers runs; layers that never run (unused deep-supervision
    heads) are left out. `layers` keeps only blocks equal to or below the given names.
    """
    modules = _parameterized_modules(network)
    if not modules:
        raise SanityError(f"{type(network).__name__}: the network has no layers with weights to randomize")
    order: list[str] = []
    hooks = [module.register_forward_hook(lambda *_, name=name: order.append(block_name(name)))
             for name, module in modules.items()]
    try:
        with torch.no_grad():
            network(torch.zeros((1, *input_shape), device=next(network.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    blocks = list(dict.fromkeys(order))[::-1]
    for name in layers:
        if not any(b == name or b.startswith(f"{name}.") for b in blocks):
            raise SanityError(f"--layers {name}: no randomizable layer of this name; the network has "
                              f"{', '.join(blocks)}")
    if layers:
        blocks = [b for b in blocks if any(b == n or b.startswith(f"{n}.") for n in layers)]
    return blocks


def randomization_steps(blocks: Sequence[str]) -> list[Step]:
    """The cascading steps (blocks 1..i random) and the independent ones (block i alone)."""
    cascading = [Step(CASCADING, i + 1, block, tuple(blocks[: i + 1])) for i, block in enumerate(blocks)]
    independent = [Step(INDEPENDENT, i + 1, block, (block,)) for i, block in enumerate(blocks)]
    return cascading + independent


def randomized_copy(network: nn.Module, blocks: Sequence[str], seed: int) -> nn.Module:
    """A copy of the network (on the CPU) whose layers in `blocks` are re-initialized, from a seed per block."""
    network = copy.deepcopy(network).cpu()
    modules = _parameterized_modules(network)
    initialize = InitWeights_He(1e-2)
    for block in blocks:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + zlib.crc32(block.encode()))
            for name, module in modules.items():
                if block_name(name) != block:
                    continue
                if not hasattr(module, "reset_parameters"):
                    raise SanityError(f"{block}: layer {name} ({type(module).__name__}) cannot be re-initialized")
                module.reset_parameters()
                initialize(module)
    return network


def _normalized(values: np.ndarray) -> np.ndarray:
    scale = np.abs(values).max()
    return values / scale if scale > 0 else values


def _ssim(first: np.ndarray, second: np.ndarray, data_range: float) -> float:
    """SSIM of two 3D maps, each scaled by its largest magnitude; window shrunk (odd, >= 3) on small boxes."""
    window = min(7, *(s if s % 2 else s - 1 for s in first.shape))
    if window < 3:
        return float("nan")
    return float(structural_similarity(_normalized(first), _normalized(second), win_size=window,
                                       data_range=data_range))


def _spearman(original: np.ndarray, randomized: np.ndarray) -> float:
    """Rank correlation; NaN when either map is constant (no ranking). Grad-CAM++ maps of a randomized network
    are often all zero after their ReLU: such maps are counted apart (`randomized_constant`), not scored 0."""
    if np.ptp(original) == 0 or np.ptp(randomized) == 0:
        return float("nan")
    return float(spearmanr(original.ravel(), randomized.ravel()).statistic)


def compare_maps(original: np.ndarray, randomized: np.ndarray) -> dict[str, float]:
    """Spearman correlation and SSIM of two maps of one box, on absolute and on signed values.

    Each map is scaled to a largest magnitude of 1 before SSIM (absolute maps in [0, 1], signed in
    [-1, 1]), so SSIM compares patterns, not the size of the gradients of a random network.
    """
    return {"spearman_abs": _spearman(np.abs(original), np.abs(randomized)),
            "spearman_signed": _spearman(original, randomized),
            "ssim_abs": _ssim(np.abs(original), np.abs(randomized), 1.0),
            "ssim_signed": _ssim(original, randomized, 2.0)}


def randomization_check(run: ReopenedRun, selection: pd.DataFrame, methods: Sequence[str], layers: Sequence[str] = (),
                        independent: bool = True, seed: int = 0, margin_mm: float = 5.0, device: str = "cpu",
                        progress: bool = False) -> pd.DataFrame:
    """Compare each selected instance's maps before and after every randomization step (one row per map).

    The cascading experiment always runs (its last step is the verdict's "full randomization");
    `independent=False` skips the one-block-at-a-time experiment.

    A last "reference" row compares two fully randomized networks (seeds `seed` and `seed + 1`): the
    similarity any random network's maps share, from the instance's shape alone.
    """
    input_shape = (len(run.channel_names), *run.model.configuration_manager.patch_size)
    blocks = randomizable_blocks(copy.deepcopy(run.model.networks[0]).cpu(), input_shape, layers)
    steps = [step for step in randomization_steps(blocks) if independent or step.experiment == CASCADING]
    spacing = run.network_spacing()
    rows = []
    with tqdm(total=selection.case.nunique() * len(methods) * (len(steps) + 2), desc="randomization",
              unit="map set", disable=not progress) as bar:
        for case, instances in selection.groupby("case", sort=False):
            case_input = run.case_input(case)
            masks = {int(i): case_input.mask(int(i)) for i in instances.instance_id}
            boxes = {i: (slice(None), *instance_box(mask, spacing, margin_mm)) for i, mask in masks.items()}
            groups = dict(zip(instances.instance_id.astype(int), instances.group))
            for method in methods:
                explain = functools.partial(_maps, run, method, case_input, masks, device, bar)
                original = explain((), seed)
                for step in steps:
                    maps = explain(step.randomized, seed)
                    rows += _comparison_rows(case, groups, method, step, original, maps, boxes, run.channel_names)
                    if step.experiment == CASCADING and step.step == len(blocks):
                        fully_random = maps
                reference = Step(REFERENCE, len(blocks), "all, seed vs seed+1", tuple(blocks))
                rows += _comparison_rows(case, groups, method, reference, fully_random, explain(blocks, seed + 1),
                                         boxes, run.channel_names)
    return pd.DataFrame(rows, columns=COLUMNS)


def _maps(run: ReopenedRun, method: str, case_input: CaseInput, masks: dict[int, np.ndarray], device: str, bar: tqdm,
          randomized: Sequence[str], seed: int) -> dict[int, np.ndarray]:
    """The method's maps of the case's instances with the blocks `randomized` re-initialized from `seed`."""
    networks = [randomized_copy(n, randomized, seed) for n in run.model.networks] if randomized else None
    maps = recompute_maps(method, run.window(device, networks), case_input.data, masks, run.settings, case_input.case)
    bar.update()
    return maps


def _comparison_rows(case: str, groups: dict[int, str], method: str, step: Step, original: dict[int, np.ndarray],
                     maps: dict[int, np.ndarray], boxes: dict[int, Slices], channel_names: list[str]) -> list[dict]:
    rows = []
    for instance_id, box in boxes.items():
        before, after = original[instance_id][box], maps[instance_id][box]
        for channel, name in enumerate(method_channels(method, channel_names)):
            rows.append({"case": case, "instance_id": instance_id, "group": groups[instance_id], "method": method,
                         "channel": name, "experiment": step.experiment, "step": step.step, "layer": step.layer,
                         **compare_maps(before[channel], after[channel]),
                         "randomized_constant": bool(np.ptp(after[channel]) == 0 and np.ptp(before[channel]) > 0)})
    return rows


def _median_abs(values: pd.Series) -> float:
    values = values.abs().dropna()
    return float(values.median()) if len(values) else float("nan")


def randomization_verdicts(table: pd.DataFrame, threshold: float = 0.5,
                           statistic: str = "spearman_abs") -> pd.DataFrame:
    """Per method and channel: "passes" when the median |statistic| after full randomization is below threshold.

    "Full randomization" is the last cascading step. "fails" otherwise; "constant" when at least as many
    instances' randomized maps are constant (a structured original turned flat: nothing left to rank) as gave a
    value; "undetermined" when no instance gave a value otherwise (constant originals). Every method and channel
    gets a row, failing ones included, with the medians of all four statistics after full randomization (over
    the non-constant maps) and between two random networks for context.
    """
    if statistic not in STATISTICS:
        raise SanityError(f"unknown statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
    cascading = table[table.experiment == CASCADING]
    final = cascading[cascading.step == cascading.step.max()]
    reference = table[table.experiment == REFERENCE]
    rows = []
    for (method, channel), maps in table.groupby(["method", "channel"], sort=False):
        chosen = final[(final.method == method) & (final.channel == channel)]
        chosen_reference = reference[(reference.method == method) & (reference.channel == channel)]
        median, valued = _median_abs(chosen[statistic]), int(chosen[statistic].notna().sum())
        constant = int(chosen.randomized_constant.astype(bool).sum())
        if constant and constant >= valued:
            verdict = "constant"
        else:
            verdict = "undetermined" if np.isnan(median) else "passes" if median < threshold else "fails"
        rows.append({"method": method, "channel": channel, "statistic": statistic, "instances": valued,
                     "constant_maps": constant, "threshold": threshold, "verdict": verdict,
                     **{f"median_abs_{s}": _median_abs(chosen[s]) for s in STATISTICS},
                     **{f"reference_median_abs_{s}": _median_abs(chosen_reference[s]) for s in STATISTICS}})
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def randomization_figure(table: pd.DataFrame) -> Figure:
    """Median (and interquartile band) of each statistic per step; one row of panels per experiment."""
    experiments = [e for e in (CASCADING, INDEPENDENT) if e in set(table.experiment)]
    figure = Figure(figsize=(4.2 * len(STATISTICS), 3.6 * len(experiments)), layout="constrained")
    axes = figure.subplots(len(experiments), len(STATISTICS), squeeze=False)
    for row, experiment in enumerate(experiments):
        rows = table[table.experiment == experiment]
        layers = rows.drop_duplicates("step").sort_values("step").layer.tolist()
        for column, statistic in enumerate(STATISTICS):
            ax = axes[row][column]
            for (method, channel), maps in rows.groupby(["method", "channel"], sort=False):
                quartiles = maps.groupby("step")[statistic].quantile([0.25, 0.5, 0.75]).unstack()
                line, = ax.plot(quartiles.index, quartiles[0.5], marker="o", label=f"{method} {channel}")
                ax.fill_between(quartiles.index, quartiles[0.25], quartiles[0.75], alpha=0.2, color=line.get_color())
                reference = table[(table.experiment == REFERENCE) & (table.method == method)
                                  & (table.channel == channel)][statistic].median()
                ax.axhline(reference, color=line.get_color(), ls="--", lw=1,
                           label=f"{method} {channel}: two random networks")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xticks(range(1, len(layers) + 1), layers, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{experiment}: {statistic}", fontsize=9)
            ax.set_ylim(-1.05, 1.05)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Model randomization: original vs randomized maps (median, IQR over instances)", fontsize=10)
    return figure


def verdict_lines(verdicts: pd.DataFrame) -> list[str]:
    """One human-readable line per method and channel."""
    return [f"{v['method']} {v['channel']}: {v['verdict']} (median |{v['statistic']}| after full randomization "
            f"{v[f'median_abs_{v.statistic}']:.3f}, between two random networks "
            f"{v[f'reference_median_abs_{v.statistic}']:.3f}, threshold {v['threshold']:g}, "
            f"{v['instances']} instances, {v['constant_maps']} constant randomized maps)"
            for _, v in verdicts.iterrows()]


def write_randomization(run: ReopenedRun, table: pd.DataFrame, verdicts: pd.DataFrame, parameters: dict) -> list[Path]:
    """OUT/sanity/randomization.csv, randomization_verdicts.csv, randomization.png and randomization.json."""
    blocks = table[table.experiment == CASCADING].drop_duplicates("step").sort_values("step").layer.tolist()
    record = {**parameters, "instances": int(table[["case", "instance_id"]].drop_duplicates().shape[0]),
              "blocks_output_to_input": blocks, "maps_compared_in": "network space, instance box",
              "ssim_scaling": "each map divided by its largest magnitude"}
    return write_outputs(run.output.sanity, {"randomization.csv": table, "randomization_verdicts.csv": verdicts,
                                             "randomization.png": randomization_figure(table),
                                             "randomization.json": record})


def randomization_sanity(run: ReopenedRun, selection: InstanceSelection, layers: Sequence[str] = (),
                         independent: bool = True, seed: int = 0, threshold: float = 0.5,
                         statistic: str = "spearman_abs", device: str = "cpu",
                         progress: bool = False) -> tuple[pd.DataFrame, list[Path]]:
    """The whole model-randomization check: compare the selected instances' maps, judge, write OUT/sanity/;
    returns the verdicts and the files written."""
    instances, methods = selection.chosen(run)
    table = randomization_check(run, instances, methods, layers, independent, seed, selection.margin_mm, device,
                                progress)
    verdicts = randomization_verdicts(table, threshold, statistic)
    paths = write_randomization(run, table, verdicts, {"methods": methods, "seed": seed,
                                                       "margin_mm": selection.margin_mm,
                                                       "samples": run.settings.samples, "layers": list(layers)})
    return verdicts, paths
