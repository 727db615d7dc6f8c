"""Faithfulness by deletion and insertion: does removing what the map calls important change the prediction?

For each instance, the voxels of its box (bounding box grown by a margin, in network space) are ranked
by the instance's stored map: by default highest signed value first (the strongest evidence for the
lesion), or by magnitude (`ranking="absolute"`, evidence for or against). Then
for k = 0 ... 50 % of the box:

- deletion: the top-k % voxels are set to 0, the normalized background value, and the lesion is
  predicted again; a faithful map makes the instance's mean lesion probability drop fast;
- insertion: the whole box is set to 0 except the top-k % voxels, which keep their values; a faithful
  map makes the probability come back fast.

The same is done with random orders of the box's voxels (several seeds). A per-channel map perturbs
its own channel only (it is the gradient with respect to that channel); a single map for all channels
perturbs all of them. Predictions use the run's sliding window, restricted to the tiles that overlap
the instance, which is exact on the instance's voxels. The area between the curves (over the fraction
of the box, trapezoidal rule) is positive when the map beats random order.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from matplotlib.figure import Figure
from scipy.integrate import trapezoid
from scipy.stats import wilcoxon
from tqdm import tqdm

from nnxai.explain.output import ALL_CHANNELS, ordered_groups, per_channel
from nnxai.explain.reopen import CaseInput, ReopenedRun
from nnxai.nnunet.geometry import _network_and_original_spacing, read_images
from nnxai.nnunet.model import LoadedModel
from nnxai.nnunet.sliding_window import SlidingWindow
from nnxai.sanity.common import InstanceSelection, SanityError, instance_box, instance_logits, write_outputs

DELETION, INSERTION = "deletion", "insertion"
MODES = (DELETION, INSERTION)
SALIENCY, RANDOM = "saliency", "random"
RANKINGS = ("signed", "absolute")
CURVE_COLUMNS = ["case", "instance_id", "group", "method", "channel", "mode", "curve", "seed", "k_percent",
                 "changed_voxels", "box_voxels", "mean_probability"]
AREA_COLUMNS = ["case", "instance_id", "group", "method", "channel", "mode", "area_saliency", "area_random",
                "area_random_sd", "area_between"]
GROUP_COLUMNS = ["group", "method", "channel", "mode", "instances", "mean_area_between", "median_area_between",
                 "fraction_positive", "wilcoxon_p", "verdict"]


def parse_percentages(text: str) -> list[float]:
    """`START:STOP:STEP` (STOP included) or a comma list, as sorted unique percentages within 0-100."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0:
                raise SanityError(f"--k {text}: the step must be positive")
            values = list(np.arange(start, stop + step / 2, step)) if stop >= start else []
        else:
            values = [float(part) for part in re.split(r"[,\s]+", text.strip()) if part]
    except ValueError:
        raise SanityError(f"--k {text}: expected START:STOP:STEP or a comma list of percentages") from None
    if any(not 0 <= value <= 100 for value in values):
        raise SanityError(f"--k {text}: percentages must lie within 0-100")
    values = sorted({round(value, 6) for value in values})
    if len(values) < 2:
        raise SanityError(f"--k {text}: a curve needs at least two percentages")
    return values


def map_to_network_space(model: LoadedModel, volume: np.ndarray, properties: dict,
                         network_shape: Sequence[int]) -> np.ndarray:
    """A (C, *input shape) float map brought to network space: transposed, cropped and resampled like the images.

    The inverse of how `nnxai explain` writes maps (the same probability resampling), exact where the
    network spacing equals the image's.
    """
    transposed = volume.transpose([0, *(axis + 1 for axis in model.plans_manager.transpose_forward)])
    cropped = transposed[(slice(None), *bounding_box_to_slice(properties["bbox_used_for_cropping"]))]
    if tuple(cropped.shape[1:]) == tuple(network_shape):
        return np.asarray(cropped, dtype=np.float32)
    network_spacing, original_spacing = _network_and_original_spacing(model, properties)
    return np.asarray(model.configuration_manager.resampling_fn_probabilities(
        cropped, list(network_shape), original_spacing, network_spacing), dtype=np.float32)


def stored_maps(run: ReopenedRun, case_input: CaseInput, method: str, instance_id: int) -> np.ndarray:
    """The instance's maps written by `nnxai explain` (one per channel, or one for all), in network space."""
    files = list(run.output.map_files(case_input.case, instance_id, method).values())
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SanityError(f"{missing[0]}: missing; explain this folder with --method {method} first")
    volume, _ = read_images(run.model, files)
    return map_to_network_space(run.model, volume, case_input.properties, case_input.data.shape[1:])


class _InstanceProbe:
    """Predicts one instance's mean lesion probability for perturbed copies of its case's input."""

    def __init__(self, window: SlidingWindow, data: torch.Tensor, mask: np.ndarray, box: tuple[slice, ...],
                 model: LoadedModel, lesion_label: int):
        self.window, self.data, self.mask, self.model, self.lesion_label = window, data, mask, model, lesion_label
        self.offset = np.array([s.start for s in box])
        self.box = box
        self.box_shape = tuple(s.stop - s.start for s in box)

    def probability(self, data: torch.Tensor) -> float:
        with torch.no_grad():
            logits = instance_logits(self.window, data, self.mask)
        return float(self.model.label_manager.apply_inference_nonlin(logits)[self.lesion_label].mean())

    def perturbed(self, mode: str, channels: Sequence[int], chosen: np.ndarray) -> torch.Tensor:
        """Deletion: the chosen box voxels set to 0. Insertion: the box set to 0 except the chosen voxels."""
        data = self.data.clone()
        index = tuple(torch.as_tensor(i + o) for i, o in zip(np.unravel_index(chosen, self.box_shape), self.offset))
        for channel in channels:
            if mode == DELETION:
                data[(channel, *index)] = 0.0
            else:
                data[(channel, *self.box)] = 0.0
                data[(channel, *index)] = self.data[(channel, *index)]
        return data


def perturbation_curves(probe: _InstanceProbe, score: np.ndarray, channels: Sequence[int], percents: Sequence[float],
                        modes: Sequence[str], seeds: Sequence[int], random_key: int) -> list[dict]:
    """Mean lesion probability for each mode, curve (`score` order, highest first; random orders) and percentage."""
    box_voxels = score.size
    orders = {(SALIENCY, None): np.argsort(-score.ravel(), kind="stable")}
    for seed in seeds:
        orders[(RANDOM, seed)] = np.random.default_rng([seed, random_key]).permutation(box_voxels)
    rows = []
    for mode in modes:
        unchanged = None  # with 0 % every order gives the same input
        for (curve, seed), order in orders.items():
            for percent in percents:
                count = int(round(percent / 100 * box_voxels))
                if count == 0 and unchanged is not None:
                    probability = unchanged
                else:
                    probability = probe.probability(probe.perturbed(mode, channels, order[:count]))
                    unchanged = probability if count == 0 else unchanged
                rows.append({"mode": mode, "curve": curve, "seed": seed, "k_percent": percent,
                             "changed_voxels": count, "box_voxels": box_voxels, "mean_probability": probability})
    return rows


def _rankings(method: str, maps: np.ndarray, channel_names: list[str]) -> list[tuple[str, np.ndarray, list[int]]]:
    """(map name, score, channels to perturb): a per-channel map perturbs its channel, a single map all of them."""
    if per_channel(method):
        return [(name, maps[index], [index]) for index, name in enumerate(channel_names)]
    return [(ALL_CHANNELS, maps[0], list(range(len(channel_names))))]


def deletion_check(run: ReopenedRun, selection: pd.DataFrame, methods: Sequence[str], percents: Sequence[float],
                   modes: Sequence[str] = (DELETION,), seeds: int = 3, seed: int = 0, margin_mm: float = 5.0,
                   ranking: str = "signed", device: str = "cpu", progress: bool = False) -> pd.DataFrame:
    """Deletion/insertion curves of every selected instance, method and map channel (one row per point).

    `ranking`: "signed" ranks voxels by the map's value (evidence for the lesion first), "absolute" by its
    magnitude (evidence for or against).
    """
    if ranking not in RANKINGS:
        raise SanityError(f"unknown ranking {ranking!r}; choose from {', '.join(RANKINGS)}")
    spacing = run.network_spacing()
    window = run.window(device)
    seed_list = [seed + i for i in range(seeds)]
    rows = []
    for case, instances in tqdm(selection.groupby("case", sort=False), desc="deletion", unit="case",
                                disable=not progress):
        case_input = run.case_input(case)
        for instance in instances.itertuples():
            instance_id = int(instance.instance_id)
            mask = case_input.mask(instance_id)
            box = instance_box(mask, spacing, margin_mm)
            probe = _InstanceProbe(window, case_input.data, mask, box, run.model, run.settings.lesion_label)
            key = zlib.crc32(f"{case}/{instance_id}".encode())
            for method in methods:
                maps = stored_maps(run, case_input, method, instance_id)[(slice(None), *box)]
                for name, score, channels in _rankings(method, maps, run.channel_names):
                    score = np.abs(score) if ranking == "absolute" else score
                    rows += [{"case": case, "instance_id": instance_id, "group": instance.group, "method": method,
                              "channel": name, **row}
                             for row in perturbation_curves(probe, score, channels, percents, modes, seed_list, key)]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def deletion_areas(curves: pd.DataFrame) -> pd.DataFrame:
    """Per instance, method, channel and mode: areas under the saliency and random curves and between them.

    Areas integrate the mean probability over the fraction of the box changed (k / 100). `area_between`
    is random minus saliency for deletion and saliency minus random for insertion: positive when the
    map's order changes the prediction faster than chance.
    """
    rows = []
    keys = ["case", "instance_id", "group", "method", "channel", "mode"]
    for key, points in curves.groupby(keys, sort=False):
        areas = {curve_seed: trapezoid(p.mean_probability, p.k_percent / 100)
                 for curve_seed, p in points.groupby(["curve", points.seed.fillna(-1)], sort=False)}
        saliency = next(area for (curve, _), area in areas.items() if curve == SALIENCY)
        random = np.array([area for (curve, _), area in areas.items() if curve == RANDOM])
        difference = random.mean() - saliency if key[-1] == DELETION else saliency - random.mean()
        rows.append({**dict(zip(keys, key)), "area_saliency": saliency, "area_random": random.mean(),
                     "area_random_sd": random.std(ddof=1) if len(random) > 1 else np.nan,
                     "area_between": difference})
    return pd.DataFrame(rows, columns=AREA_COLUMNS)


def _one_sided_wilcoxon(values: np.ndarray) -> float:
    """p of a Wilcoxon signed-rank test that the areas are above 0 (NaN without a non-zero area)."""
    values = values[values != 0]
    return float(wilcoxon(values, alternative="greater").pvalue) if len(values) else float("nan")


def deletion_groups(areas: pd.DataFrame) -> pd.DataFrame:
    """Per group, method, channel and mode: the areas between the curves summarized, with a verdict.

    "beats random" when the median area between the curves is positive, else "does not beat random".
    """
    rows = []
    for (group, method, channel, mode), subset in areas.groupby(["group", "method", "channel", "mode"], sort=False):
        between = subset.area_between.to_numpy(dtype=float)
        median = float(np.median(between))
        rows.append({"group": group, "method": method, "channel": channel, "mode": mode, "instances": len(between),
                     "mean_area_between": float(between.mean()), "median_area_between": median,
                     "fraction_positive": float((between > 0).mean()), "wilcoxon_p": _one_sided_wilcoxon(between),
                     "verdict": "beats random" if median > 0 else "does not beat random"})
    table = pd.DataFrame(rows, columns=GROUP_COLUMNS)
    order = {g: i for i, g in enumerate(ordered_groups(table.group))}
    return table.sort_values("group", key=lambda g: g.map(order), kind="stable").reset_index(drop=True)


def deletion_figure(curves: pd.DataFrame) -> Figure:
    """Mean curves per group: saliency order (solid) and random order (dashed); a panel per mode, method, channel."""
    panels = list(curves.groupby(["mode", "method", "channel"], sort=False).groups)
    figure = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    colors = {g: f"C{i}" for i, g in enumerate(ordered_groups(curves.group))}
    for ax, (mode, method, channel) in zip(axes, panels):
        panel = curves[(curves["mode"] == mode) & (curves.method == method) & (curves.channel == channel)]
        for group, color in colors.items():
            for curve, style in ((SALIENCY, "-"), (RANDOM, "--")):
                points = panel[(panel.group == group) & (panel.curve == curve)]
                if not points.empty:
                    means = points.groupby("k_percent").mean_probability.mean()
                    ax.plot(means.index, means.to_numpy(), style, color=color, marker="o", markersize=3,
                            label=f"{group} {curve}")
        ax.set_xlabel(f"% of box voxels {'removed' if mode == DELETION else 'kept'}")
        ax.set_ylabel("mean lesion probability")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{mode}: {method} {channel}", fontsize=9)
        ax.legend(fontsize=7)
    return figure


def summary_lines(groups: pd.DataFrame) -> list[str]:
    """One human-readable line per group, method, channel and mode."""
    return [f"{g.group} {g.method} {g.channel} {g['mode']}: {g.verdict} (median area between curves "
            f"{g.median_area_between:+.3f}, {g.fraction_positive:.0%} of {g.instances} instances positive)"
            for _, g in groups.iterrows()]


def write_deletion(run: ReopenedRun, curves: pd.DataFrame, parameters: dict) -> tuple[list[Path], pd.DataFrame]:
    """OUT/sanity/deletion.csv, deletion_areas.csv, deletion_groups.csv, deletion.png and deletion.json."""
    areas = deletion_areas(curves)
    groups = deletion_groups(areas)
    record = {**parameters, "instances": int(areas[["case", "instance_id"]].drop_duplicates().shape[0]),
              "background_value": 0.0, "space": "network (preprocessed) space",
              "box": "instance bounding box grown by margin_mm",
              "area": "trapezoidal, over the fraction k / 100 of the box",
              "area_between": "random - saliency (deletion), saliency - random (insertion)"}
    paths = write_outputs(run.output.sanity, {"deletion.csv": curves, "deletion_areas.csv": areas,
                                              "deletion_groups.csv": groups, "deletion.png": deletion_figure(curves),
                                              "deletion.json": record})
    return paths, groups


def deletion_sanity(run: ReopenedRun, selection: InstanceSelection, percents: Sequence[float],
                    modes: Sequence[str] = (DELETION,), seeds: int = 3, seed: int = 0, ranking: str = "signed",
                    device: str = "cpu", progress: bool = False) -> tuple[pd.DataFrame, list[Path]]:
    """The whole deletion/insertion check: curves of the selected instances, written to OUT/sanity/; returns the
    per-group verdicts and the files written."""
    instances, methods = selection.chosen(run)
    curves = deletion_check(run, instances, methods, percents, modes, seeds, seed, selection.margin_mm, ranking,
                            device, progress)
    paths, groups = write_deletion(run, curves, {"methods": methods, "k_percent": list(percents), "seeds": seeds,
                                                 "seed": seed, "margin_mm": selection.margin_mm, "ranking": ranking})
    return groups, paths
