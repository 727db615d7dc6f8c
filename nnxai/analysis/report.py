"""`nnxai report`: one self-contained HTML page of every analysis of an explain output folder.

The page (`OUT/report/report.html`) embeds its figures as base64 PNG, so it opens offline and can be mailed;
each figure is also written beside it as PNG. A section whose input is missing says "not run" and names the
command that makes it; a section whose input cannot be read says why; neither stops the others. The report
folder is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nnxai import __version__
from nnxai.analysis import figures
from nnxai.analysis.rings import RING_COLUMNS, RINGS_TABLE
from nnxai.analysis.statistics import LEVELS, STATS_COLUMNS, STATS_TABLE, SYNTHETIC_TABLE, peak_values, synthetic_table
from nnxai.analysis.viewer import DEFAULT_MAX_LESIONS, collect_lesions, viewer_html
from nnxai.explain.output import (PEAKS, AnalysisInputError, ExplainOutput, ordered_groups, peak_column, read_table,
                                  read_volume)
from nnxai.explain.uncertainty import UNCERTAINTY_COLUMNS

if TYPE_CHECKING:
    from nnxai.analysis.fpfilter import FPFilter

REPORT_FOLDER = "report"
REPORT_FILE = "report.html"
CONTEXT_TABLE = "context.csv"
CONTEXT_SUMMARY = "context_summary.json"
CONTEXT_COLUMNS = ("case", "lesion_id", "k_mm", "mean_probability", "detected")
SANITY_TITLES = {"randomization": "Model-randomization check", "randomization_verdicts": "Model-randomization verdicts",
                 "deletion": "Deletion / insertion curves", "deletion_areas": "Area between curves per instance",
                 "deletion_groups": "Deletion / insertion verdicts per group"}
MAX_TABLE_ROWS = 40
SANITY_TABLE_ROWS = 15
RING_TABLE_SHELLS = (0, 1, 2, 3)


@dataclass
class Section:
    """One part of the report: HTML text and tables, figures (file stem, figure, caption), or why it is absent.

    A figure goes where the HTML holds `figure_slot(stem)`, else after the HTML.
    """

    key: str
    title: str
    html: str = ""
    figures: list[tuple[str, Figure, str]] = field(default_factory=list)
    images: list[tuple[str, bytes, str]] = field(default_factory=list)  # PNGs written by other commands
    status: str = ""  # "" when shown, else the reason it is not
    findings: list[str] = field(default_factory=list)  # one-line results for the summary at the top


def figure_slot(stem: str) -> str:
    return f"<!--figure:{stem}-->"


def _table_html(table: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS, emphasize: pd.Series | None = None) -> str:
    """An HTML table of formatted values (first `max_rows` rows, with a note of how many there are)."""
    shown = table.head(max_rows)
    # long column names may break after an underscore, so a wide table (the sanity verdicts) fits the page
    header = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in shown.columns)
    rows = []
    for index, row in shown.iterrows():
        strong = emphasize is not None and bool(emphasize.get(index, False))
        cells = "".join(f"<td>{html.escape(_format(v))}</td>" if isinstance(v, (int, float, np.number))
                        else f'<td class="text">{html.escape(_format(v))}</td>' for v in row)
        rows.append(f'<tr class="significant">{cells}</tr>' if strong else f"<tr>{cells}</tr>")
    note = (f'<p class="note">First {max_rows} of {len(table)} rows.</p>' if len(table) > max_rows else "")
    body = "".join(rows)
    return f'<div class="table"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>{note}'


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return ""
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _not_run(key: str, title: str, missing: Path, command: str) -> Section:
    return Section(key, title, status=f"Not run: {missing} not found (made by `{command}`).")


def _cases(output: ExplainOutput) -> list[str]:
    """Every finished case of the run, also those without any instance (absent from the cohort table)."""
    folders = {p.parent.name for p in output.folder.glob("*/instances.csv") if not p.parent.name.startswith(".")}
    return sorted(folders | set(output.instances["case"].astype(str)))


def cohort_section(output: ExplainOutput) -> Section:
    settings, model = output.record.get("settings", {}), output.record.get("model") or {}
    identity = [str(model[k]) for k in ("trainer", "plans", "configuration") if model.get(k)]
    run = {"model": model.get("folder"), "trainer / plans / configuration": " / ".join(identity) or None,
           "folds": model.get("folds"), "channels": ", ".join(output.channels),
           "methods": ", ".join(output.methods), "input images": output.record.get("images"),
           "ground truth": output.record.get("ground_truth") or "none",
           **{k: settings[k] for k in ("samples", "noise", "threshold", "min_size", "connectivity", "rule")
              if k in settings}}
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in run.items() if v is not None)
    cases = _cases(output)
    groups = ordered_groups(output.instances["group"].astype(str))
    counts = pd.crosstab(output.instances["case"].astype(str), output.instances["group"].astype(str))
    counts = counts.reindex(index=cases, columns=groups, fill_value=0)
    totals = pd.DataFrame([{"cases": len(cases), "instances": len(output.instances),
                            **{g: int(counts[g].sum()) for g in groups}}])
    text = (f'<table class="settings">{rows}</table><h3>Lesion instances</h3>{_table_html(totals)}'
            "<p>TP: predicted lesion overlapping the ground truth; FP: predicted lesion without overlap; FN: "
            "ground-truth lesion the model missed (explained inside the missed lesion); unknown: no ground truth.</p>"
            f"<h3>Per case</h3>{_table_html(counts.reset_index().rename(columns={'index': 'case'}))}")
    finding = f"{_count(len(cases), 'case')}, {_count(len(output.instances), 'lesion instance')}: " + ", ".join(
        f"{int(counts[g].sum())} {g}" for g in groups) + "."
    return Section("cohort", "Cohort summary", text, findings=[finding])


def peaks_section(output: ExplainOutput, method: str) -> Section:
    values = peak_values(output, method)
    if values.empty:
        return Section("peaks", "Peak saliency per group", status="No lesion instance with saliency values.")
    groups = ordered_groups(values["group"])
    medians = values.assign(column=values.channel + " " + values.peak).pivot_table(
        index="group", columns="column", values="value", aggfunc="median").reindex(groups)
    medians = medians[[f"{c} {p}" for c in output.channels for p in PEAKS if f"{c} {p}" in medians]]
    counts = values[values.peak == PEAKS[0]].groupby(["group", "channel"]).size().unstack().reindex(groups)
    medians.insert(0, "n", counts.max(axis=1).astype(int))
    figure = figures.peak_distributions(values, output.channels, groups)
    synthetic = " and of synthetic lesions" if "synthetic" in groups else ""
    text = (_paragraph(f"Largest positive and most negative {method} value inside each instance{synthetic}, "
                       "per channel (computed in the network's preprocessed space, one spacing for all cases).")
            + "<h3>Medians per group</h3>" + _table_html(medians.reset_index()))
    return Section("peaks", "Peak saliency per group", text,
                   [("peak_saliency", figure, "Violin, box (median, quartiles) and every lesion, per group.")])


def statistics_section(output: ExplainOutput) -> Section:
    path = output.folder / STATS_TABLE
    if not path.is_file():
        return _not_run("statistics", "Statistics", path, "nnxai stats OUT")
    table = read_table(path, STATS_COLUMNS)
    levels = table["level"].dropna().unique()
    tests = table[table.test != "summary"].reset_index(drop=True)
    significant = tests.p_holm.fillna(tests.p_value.where(tests.test == "kruskal")) < 0.05
    shown = tests[["channel", "peak", "test", "group_a", "group_b", "n_a", "n_b", "statistic", "p_value", "p_holm",
                   "cliffs_delta", "median_a", "median_b", "note"]]
    overall = tests[(tests.test == "kruskal") & tests.p_value.notna()]
    first_channel = overall[overall.channel == overall.channel.iloc[0]] if len(overall) else overall
    findings = [f"{row.channel} {row.peak.replace('_', ' ')} saliency across {row.group_a.replace(',', ', ')}: "
                f"Kruskal-Wallis p = {_format(row.p_value)}." for row in first_channel.itertuples()]
    unit = " and ".join(LEVELS.get(level, str(level)) for level in levels) or "none (no test)"
    text = (_paragraph(f"Unit of analysis: {unit}. Kruskal-Wallis over all groups with enough members, then "
                       "two-sided Mann-Whitney U per pair, Holm-corrected within each channel and peak; "
                       "Cliff's delta = P(a > b) - P(a < b). Rows in bold: p (Holm for pairs) < 0.05.")
            + _table_html(shown, max_rows=len(shown), emphasize=significant))
    return Section("statistics", "Statistics", text, findings=findings)


def rings_section(output: ExplainOutput) -> Section:
    path = output.folder / RINGS_TABLE
    if not path.is_file():
        return _not_run("rings", "Ring profiles", path, "nnxai experiment rings OUT")
    rings = read_table(path, RING_COLUMNS)
    if rings.empty:
        return Section("rings", "Ring profiles", status=f"{path}: no rows (no lesion instance).")
    groups = ordered_groups(rings["group"].astype(str))
    channels = [c for c in output.channels if c in set(rings.channel)] or sorted(rings.channel.unique())
    figure = figures.ring_profiles(rings, channels, groups)
    shells = [s for s in RING_TABLE_SHELLS if s in set(rings.shell_mm)]
    summary = (rings[rings.shell_mm.isin(shells)]
               .pivot_table(index=["channel", "group"], columns="shell_mm", values="mean", aggfunc="mean")
               .reindex([(c, g) for c in channels for g in groups])
               .dropna(how="all")
               .rename(columns=lambda s: "inside" if s == 0 else f"{s} mm"))
    findings = [_ring_finding(rings[rings.channel == channels[0]], channels[0])]
    inside = rings[rings.shell_mm == 0].assign(magnitude=lambda t: t["mean"].abs())
    magnitude = inside.groupby("channel").magnitude.mean()
    ratio = ""
    if len(channels) > 1 and magnitude.get(channels[1], 0) > 0:
        times = magnitude[channels[0]] / magnitude[channels[1]]
        ratio = f" Mean |saliency| inside lesions: {channels[0]} is {times:.3g} times {channels[1]}."
        findings.append(ratio.strip())
    text = (_paragraph("Mean saliency inside each instance (0) and in 1 mm shells around its border (k: more than "
                       "k - 1 and at most k mm from the nearest lesion voxel, in the input's spacing; other lesions "
                       "left out), averaged over instances with a 95% t confidence interval." + ratio)
            + "<h3>Mean over instances</h3>" + _table_html(summary.reset_index()))
    return Section("rings", "Ring profiles", text,
                   [("ring_profiles", figure, "Mean saliency vs distance from the lesion border, per channel "
                                              "(shared y axis) and group; bands: 95% CI over instances.")],
                   findings=findings)


def _ring_finding(rings: pd.DataFrame, channel: str) -> str:
    """Sign of a channel's saliency inside lesions and its most negative shell, all instances pooled."""
    means = rings.groupby("shell_mm")["mean"].mean()
    inside = means.get(0, np.nan)
    outside = means.drop(0, errors="ignore").dropna()
    text = f"{channel} saliency inside lesions averages {_format(inside)}"
    if not outside.empty:
        text += f"; around them it is lowest at {outside.idxmin()} mm ({_format(outside.min())})"
    return text + "."


def context_section(output: ExplainOutput) -> Section:
    path = output.experiments / CONTEXT_TABLE
    if not path.is_file():
        return _not_run("context", "Perilesional context", path, "nnxai experiment context")
    context = read_table(path, CONTEXT_COLUMNS)
    if context.empty:
        return Section("context", "Perilesional context", status=f"{path}: no lesion was selected for this experiment.")
    summary_path = output.experiments / CONTEXT_SUMMARY
    summary = None
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as error:
            raise AnalysisInputError(f"{summary_path}: not valid JSON ({error})") from None
    text = _paragraph("Each selected lesion is shown to the model with only k mm of image kept around it "
                      "(the rest set to the normalized background); mean lesion probability inside the original "
                      "lesion and whether it is still detected.")
    findings = []
    if summary:
        findings.append(_context_finding(summary))
        text += f'<p class="finding">{html.escape(findings[0])}</p>'
        if summary.get("definition"):
            text += f'<p class="note">Definition: {html.escape(str(summary["definition"]))}.</p>'
        scalars = {k: v for k, v in summary.items() if not isinstance(v, (dict, list)) and k != "definition"}
        text += _table_html(pd.DataFrame([scalars]))
    else:
        text += f'<p class="note">{html.escape(str(summary_path))} not found: no required-context estimate.</p>'
    figure = figures.context_curves(context, summary)
    return Section("context", "Perilesional context", text,
                   [("context_curves", figure, "Grey: single lesions; black: mean with 95% CI; red: required "
                                               "context with its CI.")], findings=findings)


def _context_finding(summary: dict) -> str:
    required = summary.get("required_context_mm")
    if required is None:
        return "Required context: undefined" + (f" ({summary['note']})." if summary.get("note") else ".")
    text = f"Required context: {_format(float(required))} mm"
    if summary.get("ci_low") is not None and summary.get("ci_high") is not None:
        level = 100 * float(summary.get("confidence", 0.95))
        text += f" ({level:g}% CI {_format(float(summary['ci_low']))} to {_format(float(summary['ci_high']))} mm)"
    lesions = summary.get("n_lesions")
    return text + (f", from {lesions} lesions." if lesions else ".")


def synthetic_section(output: ExplainOutput, method: str) -> Section:
    synthetic = synthetic_table(output)
    if synthetic is None:
        return _not_run("synthetic", "Synthetic lesions", output.experiments / SYNTHETIC_TABLE,
                        "nnxai experiment synthetic")
    if synthetic.empty:
        return Section("synthetic", "Synthetic lesions", status="No synthetic lesion was inserted.")
    saliency = peak_column(method, output.flair_channel(), "peak_pos")
    has_saliency = saliency in synthetic.columns and synthetic[saliency].notna().any()  # none when run with 0 samples
    figure = figures.dose_response(synthetic, saliency if has_saliency else None)
    detected = synthetic.detected.astype(float)
    finding = (f"{len(synthetic)} synthetic lesions inserted into normal-appearing white matter of "
               f"{synthetic.case.nunique()} case(s); {detected.mean():.0%} detected.")
    text = _paragraph(finding)
    sweep = (synthetic.assign(detected=detected)
             .groupby(["flair_factor", "size_mm3"])[["detected", "mean_probability"]].mean().reset_index())
    if len(sweep) <= MAX_TABLE_ROWS:
        text += _table_html(sweep)
    return Section("synthetic", "Synthetic lesions: dose-response", text,
                   [("synthetic_dose_response", figure, "Means per size and FLAIR contrast factor.")],
                   findings=[finding])


def sanity_section(output: ExplainOutput) -> Section:
    """Whatever the sanity commands wrote to OUT/sanity/: tables with a verdict first, each table's own PNG (or a
    figure of its means per step) after it, JSON records folded away."""
    paths = sorted(output.sanity.glob("*.csv")) if output.sanity.is_dir() else []
    tables = [(path, read_table(path)) for path in paths]
    if not tables:
        return _not_run("sanity", "Sanity checks", output.sanity / "randomization.csv",
                        "nnxai sanity randomize / nnxai sanity deletion")
    section = Section("sanity", "Sanity checks")
    pngs = {path.stem: path for path in sorted(output.sanity.glob("*.png"))}
    for path, table in sorted(tables, key=lambda item: "verdict" not in item[1].columns):
        title = SANITY_TITLES.get(path.stem, path.stem.replace("_", " "))
        section.html += (f"<h3>{html.escape(title)} ({html.escape(path.name)})</h3>"
                         + _table_html(table, max_rows=SANITY_TABLE_ROWS))
        if "verdict" in table.columns:  # never hide a failing check: every verdict goes to the summary too
            labels = [c for c in ("method", "channel", "mode", "statistic", "group") if c in table.columns]
            section.findings.append(f"{title}: " + "; ".join(
                " ".join(str(row[c]) for c in labels) + f": {row['verdict']}" for _, row in table.iterrows()) + ".")
        if path.stem in pngs:
            png = pngs.pop(path.stem)
            section.images.append((f"sanity_{png.stem}", png.read_bytes(), f"{png.name}, as the sanity check drew it"))
            section.html += figure_slot(f"sanity_{png.stem}")
        elif (figure := figures.summary_curves(table, title)) is not None:
            section.figures.append((f"sanity_{path.stem}_means", figure, f"Means of {path.name} per step."))
            section.html += figure_slot(f"sanity_{path.stem}_means")
    for png in pngs.values():
        section.images.append((f"sanity_{png.stem}", png.read_bytes(), f"{png.name}, as the sanity check drew it"))
    for path in sorted(output.sanity.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise AnalysisInputError(f"{path}: not valid JSON ({error})") from None
        section.html += (f"<details><summary>{html.escape(path.name)} (settings of the check)</summary>"
                         f"<pre>{html.escape(json.dumps(record, indent=2))}</pre></details>")
    return section


def gallery_examples(instances: pd.DataFrame, per_group: int) -> pd.DataFrame:
    """The largest instances of each group (by voxels when known), groups in the study's order."""
    ordered = instances.sort_values("voxels", ascending=False, kind="stable") if "voxels" in instances else instances
    chosen = [ordered[ordered.group == g].head(per_group) for g in ordered_groups(instances["group"].astype(str))]
    return pd.concat(chosen) if chosen else instances.head(0)


def gallery_section(output: ExplainOutput, examples: int, method: str) -> Section:
    section = Section("gallery", "Example lesions")
    if examples == 0 or output.instances.empty:
        section.status = "No lesion to show." if output.instances.empty else "Gallery switched off (--examples 0)."
        return section
    channel = output.flair_channel()
    missing_images, left_out = 0, []
    for instance in gallery_examples(output.instances, examples).itertuples():
        try:
            example = gallery_figure(output, instance, channel, method)
        except AnalysisInputError as error:
            left_out.append(f"{instance.case} #{instance.instance_id}: {error}")
            continue
        if example is not None:
            stem, figure, title, found_image = example
            section.figures.append((stem, figure, title))
            missing_images += not found_image
    section.html = _paragraph(
        f"The {examples} largest lesions of each group: axial, coronal and sagittal slices through the lesion "
        f"(RAS, neurological view: patient's right on the right), {channel} input in grey, the lesion's {channel} "
        "saliency in red (positive) and blue (negative), centred at 0, and the lesion's contour in gold.")
    if missing_images:
        section.html += f'<p class="note">Input image not found for {missing_images} example(s).</p>'
    section.html += "".join(f'<p class="note">Left out {html.escape(reason)}</p>' for reason in left_out)
    return section


def gallery_figure(output: ExplainOutput, instance, channel: str, method: str
                   ) -> tuple[str, Figure, str, bool] | None:
    """(file stem, figure, title, whether the input image was found) of one lesion; None if it has no voxel."""
    case = str(instance.case)
    labels, spacing, _ = read_volume(output.instance_labels_path(case), canonical=True)
    mask = labels == instance.instance_id
    if not mask.any():
        return None
    saliency, _, _ = read_volume(output.map_path(case, instance.instance_id, channel, method), canonical=True)
    image_path = output.image_path(case, channel)
    image = read_volume(image_path, canonical=True)[0] if image_path else None
    if image is not None and image.shape != mask.shape:
        image = None
    volume = getattr(instance, "volume_mm3", float("nan"))
    title = f"{case} #{instance.instance_id} ({instance.group}, {volume:.0f} mm³): {channel} {method}"
    figure = figures.lesion_slices(image, np.asarray(saliency, dtype=float), mask, spacing, title)
    return f"gallery_{case}_{instance.instance_id:03d}", figure, title, image is not None


def viewer_section(output: ExplainOutput, method: str, max_lesions: int) -> Section:
    """The interactive lesion viewer with its lesion table (uncertainty beside saliency), or why it is absent."""
    section = Section("viewer", "Lesion viewer")
    if max_lesions == 0 or output.instances.empty:
        section.status = "No lesion to show." if output.instances.empty else "Viewer switched off (--no-viewer)."
        return section
    lesions, left_out = collect_lesions(output, method, max_lesions)
    if not lesions:
        section.status = "No lesion could be shown: " + "; ".join(left_out[:3])
        return section
    section.html = viewer_html(lesions, len(output.instances)) + "".join(
        f'<p class="note">Left out {html.escape(reason)}</p>' for reason in left_out)
    return section


def fpfilter_section(fp_filter: FPFilter | None) -> Section:
    """The FP filter's patient-grouped cross-validation: its pooled out-of-fold AUC with and without the
    uncertainty features, and the TP and FP instances it rests on."""
    title = "False-positive filter"
    if fp_filter is None:
        return Section("fpfilter", title, status="Not run: no filter given (`nnxai report OUT --fpfilter MODEL`, "
                                                 "MODEL made by `nnxai fpfilter train`).")
    cv = fp_filter.cross_validation
    uncertainty = [c for c in fp_filter.feature_columns if c in UNCERTAINTY_COLUMNS]
    named = ", ".join(uncertainty)
    rows = [{"features": f"{len(fp_filter.feature_columns)} features "
                         + (f"(with {named})" if uncertainty else "(no uncertainty feature)"),
             "pooled out-of-fold AUC": cv["pooled_auc"]}]
    finding = (f"False-positive filter ({cv['folds']}-fold patient-grouped CV on {cv['tp']} TP and {cv['fp']} FP "
               f"instances): pooled out-of-fold AUC {cv['pooled_auc']:.3f}")
    if "pooled_auc_without_uncertainty" in cv:
        rows.append({"features": f"{len(fp_filter.feature_columns) - len(uncertainty)} features (without {named})",
                     "pooled out-of-fold AUC": cv["pooled_auc_without_uncertainty"]})
        finding += (f" with the uncertainty features ({named}), "
                    f"{cv['pooled_auc_without_uncertainty']:.3f} without.")
    else:
        finding += " (no uncertainty features in its table)."
    folds = ", ".join("n/a" if a is None else f"{a:.3f}" for a in cv["fold_auc"])
    text = (f'<p class="finding">{html.escape(finding)}</p>' + _table_html(pd.DataFrame(rows))
            + _paragraph(f"{fp_filter.classifier} classifier trained on {', '.join(fp_filter.trained_on)}; AUC per "
                         f"fold (all features) {folds}; out of fold at P(FP) > {cv['threshold']} it would remove "
                         f"{cv['fp_removed']} of {cv['fp']} FP and {cv['tp_removed']} of {cv['tp']} TP instances."))
    return Section("fpfilter", title, text, findings=[finding])


def build_sections(output: ExplainOutput, examples: int = 3, method: str | None = None,
                   viewer_lesions: int = DEFAULT_MAX_LESIONS, fp_filter: FPFilter | None = None) -> list[Section]:
    """Every section; one whose input cannot be read becomes a section that says why (`viewer_lesions` 0: no
    viewer; `fp_filter`: a trained filter whose cross-validation to show)."""
    method = method or output.method
    builders: list[tuple[str, str, Callable[[], Section]]] = [
        ("cohort", "Cohort summary", lambda: cohort_section(output)),
        ("peaks", "Peak saliency per group", lambda: peaks_section(output, method)),
        ("statistics", "Statistics", lambda: statistics_section(output)),
        ("rings", "Ring profiles", lambda: rings_section(output)),
        ("context", "Perilesional context", lambda: context_section(output)),
        ("synthetic", "Synthetic lesions: dose-response", lambda: synthetic_section(output, method)),
        ("sanity", "Sanity checks", lambda: sanity_section(output)),
        ("fpfilter", "False-positive filter", lambda: fpfilter_section(fp_filter)),
        ("gallery", "Example lesions", lambda: gallery_section(output, examples, method)),
        ("viewer", "Lesion viewer", lambda: viewer_section(output, method, viewer_lesions)),
    ]
    sections = []
    for key, title, build in builders:
        try:
            sections.append(build())
        except AnalysisInputError as error:
            print(f"Warning: report section {title!r} left out: {error}", file=sys.stderr)
            sections.append(Section(key, title, status=f"Could not be made: {error}"))
    return sections


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 0 24px 48px; color: #222; line-height: 1.45; }
header { border-bottom: 2px solid #345; margin-bottom: 12px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-top: 12px; } h3 { margin-bottom: 6px; }
nav ol { columns: 2; margin: 8px 0 16px; }
.table { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 4px; text-align: right; }
th { background: #f1f3f6; font-size: 12px; } td.text, table.settings th, table.settings td { text-align: left; }
.findings { background: #eef4fb; border: 1px solid #c9daf0; padding: 6px 16px; }
tr.significant td { font-weight: 600; background: #fff6e0; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { font-size: 13px; color: #555; }
#nnxai-viewer-canvas { width: 100%; height: 420px; background: #000; display: block; }
#nnxai-viewer-controls button { margin: 0 6px 6px 0; } #nnxai-viewer-controls button.on { font-weight: 600; }
table.lesions tr[data-lesion] { cursor: pointer; } table.lesions tr.selected td { background: #e3efff; }
.status { padding: 8px 12px; background: #f4f4f4; border-left: 4px solid #999; color: #444; }
.finding { font-size: 16px; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def render_html(output: ExplainOutput, sections: list[Section], images: dict[str, bytes]) -> str:
    """The page: header, table of contents and every section, images inlined as base64 PNG."""
    contents = "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a>'
                       f'{" <em>(not run)</em>" if s.status.startswith("Not run") else ""}</li>' for s in sections)
    findings = [f"<li>{html.escape(f)}</li>" for s in sections for f in s.findings]
    summary = (f'<div class="findings"><h3>Main results</h3><ul>{"".join(findings)}</ul></div>' if findings else "")
    parts = []
    for section in sections:
        body = (f'<p class="status">{html.escape(section.status)}</p>' if section.status else section.html)
        for stem, caption in [(stem, caption) for stem, _, caption in section.figures] + \
                             [(stem, caption) for stem, _, caption in section.images]:
            encoded = base64.b64encode(images[stem]).decode("ascii")
            element = (f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
                       f"<figcaption>{html.escape(caption)} ({html.escape(stem)}.png)</figcaption></figure>")
            body = body.replace(figure_slot(stem), element) if figure_slot(stem) in body else body + element
        parts.append(f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>{body}</section>')
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>nnxai report: {html.escape(output.folder.name)}</title><style>{STYLE}</style></head><body>"
            f"<header><h1>nnxai report</h1><p>{html.escape(str(output.folder.resolve()))} &middot; {created} "
            f"&middot; nnxai {__version__}</p></header>{summary}<nav><ol>{contents}</ol></nav>{''.join(parts)}"
            "</body></html>\n")


def write_report(output: ExplainOutput, examples: int = 3, method: str | None = None,
                 viewer_lesions: int = DEFAULT_MAX_LESIONS, fp_filter: FPFilter | None = None) -> Path:
    """Build OUT/report/ (report.html and one PNG per figure) under a temporary name, then swap it in."""
    sections = build_sections(output, examples, method, viewer_lesions, fp_filter)
    images = {stem: png_bytes(figure) for section in sections for stem, figure, _ in section.figures}
    images.update({stem: data for section in sections for stem, data, _ in section.images})
    final = output.folder / REPORT_FOLDER
    staging = output.folder / f".{REPORT_FOLDER}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for stem, data in images.items():
            (staging / f"{stem}.png").write_bytes(data)
        (staging / REPORT_FILE).write_text(render_html(output, sections, images), encoding="utf-8")
        old = output.folder / f".{REPORT_FOLDER}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final / REPORT_FILE
