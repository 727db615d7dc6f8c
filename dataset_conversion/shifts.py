"""`nnxai convert shifts`: the Shifts 2.0 MS lesion segmentation data (SPEC section 7)."""
from __future__ import annotations

from pathlib import Path

from dataset_conversion.lesion_converter import (
    DatasetDescription,
    SourceCase,
    locate,
    make_command,
    nifti_files,
    safe_id,
)

FOLDERS = {"flair": "_FLAIR_isovox", "t1": "_T1_isovox", "gt": "_gt_isovox"}
ROLE_OF_SPLIT = {"train": "train", "dev_in": "val"}   # any other split (eval_in, dev_out, ...) is a test set


def discover(source: Path) -> list[SourceCase]:
    """One case per scan id in each `<site>/<split>/` folder that holds flair/, t1/ or gt/."""
    split_dirs = sorted({folder.parent for name in FOLDERS for folder in source.rglob(name) if folder.is_dir()})
    cases = []
    for split_dir in split_dirs:
        site, split = split_dir.parent.name, split_dir.name
        ids = sorted({scan for name, suffix in FOLDERS.items() for scan in nifti_files(split_dir / name, suffix)})
        for scan in ids:
            cases.append(SourceCase(
                case_id=safe_id(site, split, scan), patient=f"{site}/{split}/{scan}",
                channels=(locate(split_dir / "flair", f"{scan}_FLAIR_isovox.nii.gz"),
                          locate(split_dir / "t1", f"{scan}_T1_isovox.nii.gz")),
                mask=locate(split_dir / "gt", f"{scan}_gt_isovox.nii.gz"),
                role=ROLE_OF_SPLIT.get(split, "test"), details={"site": site, "split": split, "subject": scan}))
    return cases


DESCRIPTION = DatasetDescription(
    title="Shifts 2.0 MS",
    default_name="ShiftsMS",
    layout="<site>/<split>/flair/<id>_FLAIR_isovox.nii.gz, t1/<id>_T1_isovox.nii.gz and gt/<id>_gt_isovox.nii.gz",
    discover=discover,
    reference="https://shifts.grand-challenge.org",
)

HELP = """Convert Shifts 2.0 MS: <site>/<split>/{flair,t1,gt}/<id>_{FLAIR,T1,gt}_isovox.nii.gz below SOURCE.
Shifts' own splits are kept: train trains, dev_in validates (fold 0 of splits_final.json), every other split
(eval_in, dev_out, ...) is a test set; --val-fraction and --test-fraction do not apply. Scans without a T1
are skipped with the reason, as the dataset has two channels. Shifts does not say which scans share a
patient, so each scan counts as its own patient. Case ids are SITE_SPLIT_ID; site and split are also
columns of the case table."""

command = make_command(DESCRIPTION, HELP)
