"""`nnxai experiment rings`, `nnxai stats` and `nnxai report`: analyses of an explain output folder."""
from __future__ import annotations

from pathlib import Path

import click

from nnxai.explain.output import load_explain_output

out_folder = click.argument("out", type=click.Path(path_type=Path))


@click.command("rings")
@out_folder
@click.option("--max-mm", type=click.IntRange(min=1), default=10, show_default=True,
              help="Outermost shell, in mm from the lesion border.")
@click.option("--method", default=None, help="Saliency method whose maps to read [default: the run's].")
def rings(out: Path, max_mm: int, method: str | None) -> None:
    """Saliency inside each instance and in 1 mm shells around it, per channel: OUT/rings.csv."""
    from nnxai.analysis.rings import ring_table, write_rings

    output = load_explain_output(out)
    path = write_rings(output, ring_table(output, max_mm, method, progress=True))
    click.echo(f"Wrote {path}")


@click.command("stats")
@out_folder
@click.option("--min-n", type=click.IntRange(min=1), default=3, show_default=True,
              help="Fewest members a group needs to be tested.")
@click.option("--method", default=None, help="Saliency method whose peaks to compare [default: the run's].")
@click.option("--level", type=click.Choice(["lesion", "patient"]), default="lesion", show_default=True,
              help="Unit of analysis: every lesion, or each patient's (case's) median per group.")
def stats(out: Path, min_n: int, method: str | None, level: str) -> None:
    """Peak saliency per channel across TP / FP / FN / synthetic lesions: OUT/stats.csv.

    Kruskal-Wallis over all groups, pairwise Mann-Whitney U with Holm correction, Cliff's delta.
    """
    from nnxai.analysis.statistics import group_statistics, write_statistics

    output = load_explain_output(out)
    table = group_statistics(output, min_n, method, level)
    path = write_statistics(output, table)
    click.echo(f"Wrote {path}")


@click.command("report")
@out_folder
@click.option("--examples", type=click.IntRange(min=0), default=3, show_default=True,
              help="Gallery lesions per group.")
@click.option("--method", default=None, help="Saliency method to show [default: the run's].")
@click.option("--viewer/--no-viewer", default=True, show_default=True,
              help="Embed the interactive 3D lesion viewer (NiiVue, WebGL2); the static slices stay either way.")
@click.option("--viewer-lesions", type=click.IntRange(min=1), default=40, show_default=True,
              help="Most lesions the viewer embeds (each adds its cropped volumes to the page).")
@click.option("--fpfilter", "fpfilter_model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A filter made by `nnxai fpfilter train` (a pickle: trusted files only): the report shows its "
                   "cross-validated AUC with and without the uncertainty features.")
def report(out: Path, examples: int, method: str | None, viewer: bool, viewer_lesions: int,
           fpfilter_model: Path | None) -> None:
    """One self-contained HTML report of all analyses: OUT/report/report.html (figures also as PNG)."""
    from nnxai.analysis.fpfilter import FPFilter
    from nnxai.analysis.report import write_report

    fp_filter = FPFilter.load(fpfilter_model) if fpfilter_model else None
    path = write_report(load_explain_output(out), examples, method, viewer_lesions if viewer else 0, fp_filter)
    click.echo(f"Wrote {path}")
