"""`nnxai merge OUT`: cohort table of an explain folder written by several shards, and the cases still missing."""
from __future__ import annotations

from pathlib import Path

import click

from nnxai.explain.merge import merge_outputs
from nnxai.explain.output import CASE_TABLE


@click.command("merge", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-i", "images", type=click.Path(path_type=Path),
              help="Input folder the cases should come from [default: the one in OUT/run.json].")
@click.option("--allow-missing", is_flag=True, help="Exit with status 0 even when cases are missing.")
def merge(out: Path, images: Path | None, allow_missing: bool) -> None:
    """Build OUT/instances.csv from the finished case folders of OUT; list missing and half-written cases.

    Exits with status 1 when an input case has no finished folder (a re-run of `nnxai explain` with the
    same options does only those), unless --allow-missing.
    """
    report = merge_outputs(out, images)
    click.echo(f"{out}: {len(report.cases) - len(report.missing)} of {len(report.cases)} case(s) finished; "
               f"{report.instances} instance(s) in {out / CASE_TABLE}")
    if report.partial:
        click.echo(f"half-written (a run stopped while writing them): {', '.join(report.partial)}", err=True)
    if report.missing:
        click.echo(f"missing {len(report.missing)} case(s): {', '.join(report.missing)}", err=True)
        if not allow_missing:
            raise SystemExit(1)
