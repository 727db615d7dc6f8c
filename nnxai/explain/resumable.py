"""The one resumable loop over a cohort's cases, shared by `nnxai explain` and the experiments.

Each case's result is written atomically by the caller's `compute`, so a case is either finished or absent; a
re-run skips the finished ones. A case that raises CaseError fails alone (reported, nothing written) and the
others go on; any other error stops the run.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from nnxai.explain.cases import CaseError


@dataclass
class CohortResult:
    """Cases computed now, skipped because finished earlier, and failed (case -> one-line reason)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def run_resumable(cases: Iterable[str], finished: Callable[[str], bool], compute: Callable[[str], None],
                  description: str = "cases", progress: bool = True) -> CohortResult:
    """`compute(case)` for every case not `finished(case)` yet."""
    result = CohortResult()
    for case in tqdm(list(cases), desc=description, unit="case", disable=not progress):
        if finished(case):
            result.skipped.append(case)
            continue
        try:
            compute(case)
        except CaseError as error:
            result.failed[case] = str(error)
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        result.done.append(case)
    return result


def concat_tables(paths: Iterable[Path]) -> pd.DataFrame:
    """Per-case CSV tables concatenated in path order, case names kept as text; the columns of an empty table are
    kept when every table is empty."""
    tables = [pd.read_csv(path, dtype={"case": str}) for path in sorted(paths)]
    non_empty = [table for table in tables if not table.empty]
    if non_empty:
        return pd.concat(non_empty, ignore_index=True)
    return tables[0] if tables else pd.DataFrame()
