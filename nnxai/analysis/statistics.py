"""Peak saliency compared across lesion groups (SPEC 5, statistics): is saliency quantitative?

For every channel and both peaks (largest positive and most negative value of an instance's map inside the
instance), the groups TP / FP / FN / synthetic (and "unknown" when the run had no ground truth) are compared
with a Kruskal-Wallis test over all groups, then pairwise two-sided Mann-Whitney U tests whose p-values are
Holm-corrected within that channel and peak, with Cliff's delta as effect size
(delta = P(a > b) - P(a < b), from -1 to 1; positive when group_a tends to be larger).
Groups with fewer than `min_n` values are not tested; their rows say "n too small".

The unit of analysis (`level`, recorded in every row): "lesion" takes every lesion as one value, treating
lesions of one patient as independent; "patient" first takes each case's median per group, so every patient
(an nnU-Net case) counts once per group and no patient with many lesions dominates.
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kruskal, mannwhitneyu

from nnxai.explain.output import PEAKS, ExplainOutput, ordered_groups, peak_column, read_table, require_columns
from nnxai.files import write_atomically

STATS_TABLE = "stats.csv"
SYNTHETIC_TABLE = "synthetic.csv"
SYNTHETIC_GROUP = "synthetic"
SYNTHETIC_COLUMNS = ("case", "lesion_id", "size_mm3", "flair_factor", "t1_factor", "detected", "mean_probability")
STATS_COLUMNS = ["method", "channel", "peak", "test", "group_a", "group_b", "n_a", "n_b", "statistic", "p_value",
                 "p_holm", "cliffs_delta", "median_a", "median_b", "note", "level"]
TOO_SMALL = "n too small"
LEVELS = {"lesion": "lesions (every lesion one value; lesions of one patient treated as independent)",
          "patient": "patients (each case's median per group: every patient counts once per group)"}


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: the i-th smallest p times (m - i + 1), made monotone, capped at 1."""
    p_values = np.asarray(p_values, dtype=float)
    order = np.argsort(p_values)
    scaled = p_values[order] * (len(p_values) - np.arange(len(p_values)))
    adjusted = np.empty_like(p_values)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def cliffs_delta(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) - P(a < b) over all pairs, from the Mann-Whitney U of `a` (U = #(a > b) + #ties / 2)."""
    u = mannwhitneyu(a, b).statistic
    return float(2 * u / (len(a) * len(b)) - 1)


def synthetic_table(output: ExplainOutput) -> pd.DataFrame | None:
    """OUT/experiments/synthetic.csv when the synthetic-lesion experiment ran, else None."""
    path = output.experiments / SYNTHETIC_TABLE
    return read_table(path, SYNTHETIC_COLUMNS) if path.is_file() else None


def peak_values(output: ExplainOutput, method: str | None = None) -> pd.DataFrame:
    """Long table (case, group, channel, peak, value) of every instance's and synthetic lesion's peaks, NaN dropped."""
    method = method or output.method
    columns = [peak_column(method, channel, peak) for channel in output.channels for peak in PEAKS]
    require_columns(output.instances, ["case", *columns], output.folder / "instances.csv")
    sources = [output.instances[["case", "group", *columns]]]
    synthetic = synthetic_table(output)
    if synthetic is not None:
        require_columns(synthetic, columns, output.experiments / SYNTHETIC_TABLE)
        sources.append(synthetic[["case", *columns]].assign(group=SYNTHETIC_GROUP))
    rows = []
    for source in sources:
        for channel in output.channels:
            for peak in PEAKS:
                values = pd.to_numeric(source[peak_column(method, channel, peak)], errors="coerce")
                rows.append(pd.DataFrame({"case": source["case"].astype(str), "group": source["group"].astype(str),
                                          "channel": channel, "peak": peak, "value": values}))
    return pd.concat(rows, ignore_index=True).dropna(subset=["value"])


def compare_groups(values: dict[str, np.ndarray], min_n: int) -> list[dict]:
    """Summary, Kruskal-Wallis and Holm-corrected pairwise rows for one family (one channel and peak)."""
    rows = [{"test": "summary", "group_a": g, "n_a": len(v), "median_a": float(np.median(v)) if len(v) else np.nan,
             "note": TOO_SMALL if len(v) < min_n else ""} for g, v in values.items()]
    testable = [g for g, v in values.items() if len(v) >= min_n]
    small = [g for g in values if g not in testable]
    overall = {"test": "kruskal", "group_a": ",".join(testable), "n_a": sum(len(values[g]) for g in testable)}
    if len(testable) < 2:
        overall["note"] = f"{TOO_SMALL}: fewer than two groups with n >= {min_n}"
    elif len(np.unique(np.concatenate([values[g] for g in testable]))) == 1:
        overall["note"] = "all values identical"
    else:
        result = kruskal(*(values[g] for g in testable))
        overall.update(statistic=float(result.statistic), p_value=float(result.pvalue),
                       note=f"not tested ({TOO_SMALL}): {','.join(small)}" if small else "")
    rows.append(overall)
    pairs = []
    for a, b in combinations(values, 2):
        pair = {"test": "mannwhitneyu", "group_a": a, "group_b": b, "n_a": len(values[a]), "n_b": len(values[b]),
                "median_a": float(np.median(values[a])) if len(values[a]) else np.nan,
                "median_b": float(np.median(values[b])) if len(values[b]) else np.nan}
        if a in testable and b in testable:
            result = mannwhitneyu(values[a], values[b], alternative="two-sided")
            pair.update(statistic=float(result.statistic), p_value=float(result.pvalue),
                        cliffs_delta=cliffs_delta(values[a], values[b]), note="")
        else:
            pair["note"] = TOO_SMALL
        pairs.append(pair)
    tested = [p for p in pairs if "p_value" in p]
    for pair, adjusted in zip(tested, holm(np.array([p["p_value"] for p in tested]))):
        pair["p_holm"] = float(adjusted)
    return rows + pairs


def patient_medians(values: pd.DataFrame) -> pd.DataFrame:
    """Peak values (see `peak_values`) reduced to one per case, group, channel and peak: their median."""
    return values.groupby(["case", "group", "channel", "peak"], as_index=False, sort=False)["value"].median()


def group_statistics(output: ExplainOutput, min_n: int = 3, method: str | None = None,
                     level: str = "lesion") -> pd.DataFrame:
    """The tidy statistics table of an explain output (plus its synthetic lesions when present), with lesions or
    patients as the unit of analysis (`level`, see module doc)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    method = method or output.method
    values = peak_values(output, method)
    if level == "patient":
        values = patient_medians(values)
    groups = ordered_groups(values["group"])
    rows = []
    for channel in output.channels:
        for peak in PEAKS:
            family = values[(values.channel == channel) & (values.peak == peak)]
            by_group = {g: family.loc[family.group == g, "value"].to_numpy(dtype=float) for g in groups}
            rows += [{"method": method, "channel": channel, "peak": peak, **row, "level": level}
                     for row in compare_groups(by_group, min_n)]
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


def write_statistics(output: ExplainOutput, table: pd.DataFrame) -> Path:
    """OUT/stats.csv, written atomically."""
    path = output.folder / STATS_TABLE
    write_atomically(path, lambda p: table.to_csv(p, index=False))
    return path
