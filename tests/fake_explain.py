"""Explain output folders as the false-positive filter reads them, built on the analyses' fake outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tests.fake_explain_output import FakeInstance, save, write_output

__all__ = ["FakeInstance", "save", "write_filter_output"]


def write_filter_output(out: Path, cases: dict[str, list[FakeInstance]], spacing=(1.0, 1.0, 1.0),
                        probabilities: dict[tuple[str, int], float] | None = None,
                        gradcampp: dict[tuple[str, int], np.ndarray] | None = None,
                        ground_truth: Path | None = None) -> Path:
    """`write_output`'s folder (nibabel array order) plus what the filter also reads.

    That is each instance's mean probability (default 0.9), each case's binary prediction (its non-FN
    instances), Grad-CAM++ maps keyed by (case, instance id), and the run's ground-truth folder.
    """
    write_output(out, cases, spacing)
    record = json.loads((out / "run.json").read_text())
    record["ground_truth"] = str(ground_truth) if ground_truth else None
    (out / "run.json").write_text(json.dumps(record))
    tables = []
    for case, instances in cases.items():
        table = pd.read_csv(out / case / "instances.csv")
        table["mean_probability"] = [(probabilities or {}).get((case, i), 0.9) for i in table["instance_id"]]
        table.to_csv(out / case / "instances.csv", index=False)
        tables.append(table)
        predicted = np.any([i.mask for i in instances if i.group != "FN"], axis=0)
        save(predicted.astype(np.uint8), out / case / "prediction.nii.gz", spacing)
    pd.concat(tables, ignore_index=True).to_csv(out / "instances.csv", index=False)
    for (case, instance_id), volume in (gradcampp or {}).items():
        save(volume.astype(np.float32), out / case / "gradcampp" / f"{instance_id:03d}.nii.gz", spacing)
    return out
