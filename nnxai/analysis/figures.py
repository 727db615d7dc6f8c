"""The report's figures, each built from a table (or volumes) into a matplotlib Figure without pyplot."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy.stats import t as student_t

GROUP_COLOURS = {"TP": "#1b9e77", "FP": "#d95f02", "FN": "#7570b3", "synthetic": "#e7298a", "unknown": "#666666"}
PEAK_TITLES = {"peak_pos": "peak positive saliency", "peak_neg": "peak negative saliency"}
MAX_LEVELS = 6  # a sweep variable with more distinct values is binned into quantile groups


def colour(group: str) -> str:
    return GROUP_COLOURS.get(group, "#333333")


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean with its Student-t confidence interval (NaN bounds for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan, np.nan, np.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, np.nan, np.nan
    half = float(student_t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return mean, mean - half, mean + half


def peak_distributions(values: pd.DataFrame, channels: list[str], groups: list[str]) -> Figure:
    """Violin + box + points of peak saliency per group: rows = positive / negative peak, columns = channels."""
    peaks = list(PEAK_TITLES)
    figure = Figure(figsize=(3.6 * len(channels) + 0.6, 3.2 * len(peaks)), layout="constrained")
    axes = figure.subplots(len(peaks), len(channels), squeeze=False)
    rng = np.random.default_rng(0)
    for row, peak in enumerate(peaks):
        for column, channel in enumerate(channels):
            axis = axes[row, column]
            family = values[(values.channel == channel) & (values.peak == peak)]
            data = [family.loc[family.group == g, "value"].to_numpy(dtype=float) for g in groups]
            for position, (group, group_values) in enumerate(zip(groups, data), start=1):
                if group_values.size >= 2 and np.ptp(group_values) > 0:
                    body = axis.violinplot(group_values, [position], widths=0.8, showextrema=False)["bodies"][0]
                    body.set_facecolor(colour(group))
                    body.set_alpha(0.35)
                if group_values.size:
                    axis.boxplot(group_values, positions=[position], widths=0.25, showfliers=False,
                                 medianprops={"color": "black"})
                    jitter = rng.uniform(-0.12, 0.12, group_values.size)
                    axis.scatter(position + jitter, group_values, s=8, color=colour(group), alpha=0.7, zorder=3)
            axis.set_xticks(range(1, len(groups) + 1), [f"{g}\nn={len(d)}" for g, d in zip(groups, data)])
            axis.set_xlim(0.4, len(groups) + 0.6)
            axis.axhline(0, color="0.6", linewidth=0.6)
            axis.set_title(f"{channel}: {PEAK_TITLES[peak]}", fontsize=10)
    return figure


def ring_profiles(rings: pd.DataFrame, channels: list[str], groups: list[str]) -> Figure:
    """Mean saliency per shell (0 = inside) with 95% CI over instances, per channel (shared y) and group."""
    figure = Figure(figsize=(4.2 * len(channels) + 0.6, 3.6), layout="constrained")
    axes = figure.subplots(1, len(channels), squeeze=False, sharey=True)[0]
    for axis, channel in zip(axes, channels):
        for group in groups:
            subset = rings[(rings.channel == channel) & (rings.group == group)]
            if subset.empty:
                continue
            shells = sorted(subset.shell_mm.unique())
            stats = np.array([mean_ci(subset.loc[subset.shell_mm == s, "mean"]) for s in shells])
            instances = subset[["case", "instance_id"]].drop_duplicates().shape[0]
            axis.plot(shells, stats[:, 0], marker="o", markersize=3, color=colour(group),
                      label=f"{group} (n={instances})")
            axis.fill_between(shells, stats[:, 1], stats[:, 2], color=colour(group), alpha=0.2, linewidth=0)
        axis.axhline(0, color="0.5", linewidth=0.7)
        axis.axvline(0.5, color="0.7", linewidth=0.7, linestyle=":")
        axis.set_xlabel("shell (mm from lesion border; 0 = inside)")
        axis.set_title(channel)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("mean saliency (95% CI)")
    return figure


def context_curves(context: pd.DataFrame, summary: dict | None) -> Figure:
    """Mean lesion probability and fraction detected vs the context kept around the lesion (k mm)."""
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    probability_axis, detection_axis = figure.subplots(1, 2)
    for _, lesion in context.groupby(["case", "lesion_id"]):
        lesion = lesion.sort_values("k_mm")
        probability_axis.plot(lesion.k_mm, lesion.mean_probability, color="0.75", linewidth=0.7)
    ks = sorted(context.k_mm.unique())
    stats = np.array([mean_ci(context.loc[context.k_mm == k, "mean_probability"]) for k in ks])
    probability_axis.plot(ks, stats[:, 0], color="black", label="mean over lesions")
    probability_axis.fill_between(ks, stats[:, 1], stats[:, 2], color="black", alpha=0.2, linewidth=0)
    detected = context.assign(detected=context.detected.astype(float)).groupby("k_mm").detected.mean()
    detection_axis.plot(detected.index, detected.to_numpy(), color="black", marker="o", markersize=3)
    probability_axis.set_ylabel("mean probability inside the lesion")
    detection_axis.set_ylabel("fraction of lesions detected")
    lesions = context[["case", "lesion_id"]].drop_duplicates().shape[0]
    for axis in (probability_axis, detection_axis):
        axis.set_xlabel("context kept around the lesion (mm)")
        axis.set_ylim(-0.03, 1.03)
        if summary and summary.get("required_context_mm") is not None:
            required = float(summary["required_context_mm"])
            low, high = summary.get("ci_low"), summary.get("ci_high")
            if low is not None and high is not None:
                axis.axvspan(float(low), float(high), color="tab:red", alpha=0.12, linewidth=0)
            axis.axvline(required, color="tab:red", label=f"required context {required:g} mm")
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Perilesional context ({lesions} lesions)")
    return figure


def levels(values: pd.Series) -> pd.Series:
    """A sweep variable as plot levels: its own values when few, else quantile bins labelled by their range."""
    if values.nunique() <= MAX_LEVELS:
        return values
    binned = pd.qcut(values, q=min(4, values.nunique()), duplicates="drop")
    return binned.map(lambda interval: f"{interval.left:.3g}-{interval.right:.3g}").astype(str)


def sorted_levels(table: pd.DataFrame, level_column: str, value_column: str) -> list:
    """Levels ordered by the smallest value they hold."""
    return list(table.groupby(level_column)[value_column].min().sort_values().index)


def dose_response(synthetic: pd.DataFrame, saliency_column: str | None) -> Figure:
    """Detection, mean probability (and a peak saliency) of synthetic lesions vs size, one line per FLAIR contrast.

    Sizes and contrasts with more than `MAX_LEVELS` distinct values (random sampling instead of a sweep) are
    grouped into quantile bins.
    """
    columns = [("detected", "fraction detected"), ("mean_probability", "mean probability inside the lesion")]
    if saliency_column:
        columns.append((saliency_column, saliency_column.replace("_", " ")))
    figure = Figure(figsize=(4.2 * len(columns), 3.8), layout="constrained")
    axes = figure.subplots(1, len(columns))
    table = synthetic.assign(detected=synthetic.detected.astype(float), contrast=levels(synthetic.flair_factor),
                             size=levels(synthetic.size_mm3))
    binned_sizes = table["size"].nunique() < synthetic.size_mm3.nunique()
    sizes = sorted_levels(table, "size", "size_mm3")
    contrasts = sorted_levels(table, "contrast", "flair_factor")
    colours = colormaps["viridis"](np.linspace(0, 0.9, len(contrasts)))
    for axis, (column, label) in zip(axes, columns):
        for contrast, line_colour in zip(contrasts, colours):
            means = table[table.contrast == contrast].groupby("size")[column].mean()
            means = means.reindex([s for s in sizes if s in means.index])
            positions = [sizes.index(s) for s in means.index] if binned_sizes else means.index.to_numpy(dtype=float)
            axis.plot(positions, means.to_numpy(), marker="o", markersize=4, color=line_colour,
                      label=f"FLAIR x {contrast}")
        if binned_sizes:
            axis.set_xticks(range(len(sizes)), sizes, rotation=30, fontsize=8)
            axis.set_xlabel("lesion size (mm³, quantile bins)")
        else:
            axis.set_xscale("log")
            axis.set_xlabel("lesion size (mm³)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    for axis in axes[:2]:
        axis.set_ylim(-0.03, 1.03)
    figure.suptitle(f"Synthetic lesions (n={len(synthetic)}): dose-response")
    return figure


GALLERY_HALF_WIDTH_MM = 24.0
# (name, axis through which the slice is cut, horizontal axis, vertical axis, orientation letters l/r/b/t); RAS arrays
VIEWS = (("axial", 2, 0, 1, "LRPA"), ("coronal", 1, 0, 2, "LRIS"), ("sagittal", 0, 1, 2, "PAIS"))


def lesion_slices(image: np.ndarray | None, saliency: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...],
                  title: str) -> Figure:
    """Axial, coronal and sagittal slices through a lesion (arrays RAS oriented), the instance contour in gold.

    Top row: the image alone, so the lesion itself stays visible; bottom row: the saliency over it (diverging
    colours centred at 0, values below 5% of the largest magnitude transparent).
    """
    points = np.argwhere(mask)
    centre = points[np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1))]
    box = tuple(slice(max(c - int(np.ceil(GALLERY_HALF_WIDTH_MM / s)), 0),
                      min(c + int(np.ceil(GALLERY_HALF_WIDTH_MM / s)) + 1, n))
                for c, s, n in zip(centre, spacing, mask.shape))
    limit = float(np.abs(saliency[box]).max()) or 1.0
    background = np.zeros(mask.shape) if image is None else image
    low, high = np.percentile(background[box], [1, 99]) if image is not None else (0.0, 1.0)
    figure = Figure(figsize=(9.5, 6.4), layout="constrained")
    axes = figure.subplots(2, 3)
    for column, (name, cut, horizontal, vertical, letters) in enumerate(VIEWS):
        section = list(box)
        section[cut] = centre[cut]
        section = tuple(section)
        h, v = box[horizontal], box[vertical]
        extent = ((h.start - 0.5) * spacing[horizontal], (h.stop - 0.5) * spacing[horizontal],
                  (v.start - 0.5) * spacing[vertical], (v.stop - 0.5) * spacing[vertical])
        values = saliency[section].T
        for row, axis in enumerate(axes[:, column]):
            axis.imshow(background[section].T, cmap="gray", vmin=low, vmax=high if high > low else low + 1,
                        origin="lower", extent=extent, interpolation="nearest")
            if row == 1:
                overlay = axis.imshow(np.ma.masked_where(np.abs(values) < 0.05 * limit, values), cmap="RdBu_r",
                                      vmin=-limit, vmax=limit, origin="lower", extent=extent, alpha=0.85,
                                      interpolation="nearest")
            axis.contour(np.arange(h.start, h.stop) * spacing[horizontal],
                         np.arange(v.start, v.stop) * spacing[vertical], mask[section].T.astype(float),
                         levels=[0.5], colors="gold", linewidths=1.2)
            for text, position, alignment in zip(letters, ((0.02, 0.5), (0.98, 0.5), (0.5, 0.02), (0.5, 0.98)),
                                                 (("left", "center"), ("right", "center"), ("center", "bottom"),
                                                  ("center", "top"))):
                axis.text(*position, text, transform=axis.transAxes, color="white", fontsize=8, ha=alignment[0],
                          va=alignment[1])
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(name, fontsize=9)
    figure.colorbar(overlay, ax=axes[1, :], shrink=0.9, label="saliency")
    figure.colorbar(overlay, ax=axes[0, :], shrink=0.9).ax.set_visible(False)  # keeps both rows the same width
    figure.suptitle(title + ("" if image is not None else " (input image not found: saliency only)"), fontsize=10)
    return figure


IDENTIFIER_COLUMNS = ("case", "instance_id", "lesion_id", "seed")
MAX_LINES = 8
STEP_COLUMNS = ("step", "k", "k_percent", "k_mm", "percent", "fraction")


def summary_curves(table: pd.DataFrame, title: str) -> Figure | None:
    """Means of a table's numeric columns against its first stepped numeric column, a line per category.

    For tables whose layout this module does not know (the sanity checks'): the first step-like column
    (`STEP_COLUMNS`) with 2-40 distinct values is the x axis, up to four other numeric columns are plotted,
    and text columns with few values (not identifiers, not mere labels of the x values) split the lines,
    at most `MAX_LINES`.
    None when the table has no such x axis or nothing to plot.
    """
    numeric = [c for c in table.select_dtypes("number").columns
               if c not in IDENTIFIER_COLUMNS and not c.endswith("_id")]
    x = next((c for c in numeric if c in STEP_COLUMNS and 2 <= table[c].nunique() <= 40), None)
    ys = [c for c in numeric if c != x and table[c].nunique() > 1][:4]
    if x is None or not ys:
        return None
    candidates = sorted((c for c in table.columns if c not in numeric and c not in IDENTIFIER_COLUMNS
                         and table[c].dtype != float and 2 <= table[c].nunique() <= MAX_LINES
                         and table.groupby(x)[c].nunique().max() > 1),  # a mere label of x splits nothing
                        key=lambda c: table[c].nunique())
    categories, lines_count = [], 1
    for column in candidates:  # the columns with fewest values first, while the lines stay few
        if lines_count * table[column].nunique() <= MAX_LINES:
            categories.append(column)
            lines_count *= table[column].nunique()
    figure = Figure(figsize=(4.2 * len(ys), 3.6), layout="constrained")
    axes = figure.subplots(1, len(ys), squeeze=False)[0]
    lines = table.groupby(categories) if categories else [("all", table)]
    for key, subset in lines:
        label = ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        means = subset.groupby(x)[ys].mean()
        for axis, y in zip(axes, ys):
            axis.plot(means.index, means[y], marker="o", markersize=3, label=label)
    for axis, y in zip(axes, ys):
        axis.set_xlabel(x)
        axis.set_ylabel(f"mean {y}")
        if categories:
            axis.legend(fontsize=7)
    figure.suptitle(title)
    return figure
