"""`nnxai merge`: after several runs wrote into one explain output folder (cluster shards, resumed runs),
build the cohort table from the finished case folders and say which input cases are not there yet.

A case is finished when `OUT/<case>/instances.csv` exists (explain renames a complete folder into place).
A leftover `OUT/.<case>.partial` staging folder means a run was stopped while writing that case.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nnxai.explain.cases import CaseError, find_cases
from nnxai.explain.cohort import collect_tables, prepare_output_folder
from nnxai.explain.output import CASE_TABLE, RUN_RECORD, read_run_record
from nnxai.files import write_atomically

PARTIAL_SUFFIX = ".partial"


@dataclass
class MergeReport:
    """Cases of the input folder, which of them are finished or missing, leftover staging folders, table rows."""

    cases: list[str]
    finished: list[str]
    missing: list[str]
    partial: list[str]
    instances: int


def finished_cases(out_dir: Path) -> list[str]:
    """Case folders that explain completed (they hold the case's instance table)."""
    return sorted(p.parent.name for p in out_dir.glob(f"*/{CASE_TABLE}") if not p.parent.name.startswith("."))


def partial_cases(out_dir: Path) -> list[str]:
    """Cases whose `.<case>.partial` staging folder was left behind by a stopped run."""
    return sorted(p.name[1:-len(PARTIAL_SUFFIX)] for p in out_dir.glob(f".*{PARTIAL_SUFFIX}") if p.is_dir())


def expected_cases(record: dict, images_dir: Path | None, record_path: Path) -> list[str]:
    """The input folder's cases, found as explain found them (the run's file ending and channel count)."""
    if "file_ending" not in record or "channels" not in record:
        raise CaseError(f"{record_path}: has no file_ending or channels; re-run nnxai explain to record them")
    if images_dir is None:
        images_dir = Path(record["images"])
        if not images_dir.is_dir():
            raise CaseError(f"{images_dir}: input folder named in {record_path} not found; give it with -i")
    return list(find_cases(images_dir, record["file_ending"], len(record["channels"])))


def merge_outputs(out_dir: Path, images_dir: Path | None = None) -> MergeReport:
    """Write OUT/instances.csv from every finished case and compare the finished cases with the input's."""
    record = read_run_record(out_dir)
    cases = expected_cases(record, images_dir, out_dir / RUN_RECORD)
    prepare_output_folder(out_dir)
    finished = finished_cases(out_dir)
    table = collect_tables(out_dir)
    write_atomically(out_dir / CASE_TABLE, table.to_csv(index=False))
    done = set(finished)
    return MergeReport(cases=cases, finished=finished, missing=[c for c in cases if c not in done],
                       partial=partial_cases(out_dir), instances=len(table))
