"""`nnxai convert mslesseg`: the MSLesSeg 2024 dataset (SPEC section 7)."""
from __future__ import annotations

from pathlib import Path

from dataset_conversion.lesion_converter import (
    DatasetDescription,
    SourceCase,
    is_split_folder,
    is_test_folder,
    locate,
    make_command,
    nifti_files,
    safe_id,
)

SUFFIXES = ("_FLAIR", "_T1", "_MASK")


def discover(source: Path) -> list[SourceCase]:
    """One case per scan prefix (e.g. P1_T1 in train/P1/T1/P1_T1_FLAIR.nii.gz) found with any of its files."""
    folders = {path.parent for suffix in SUFFIXES for path in source.rglob(f"*{suffix}.nii*")}
    scans = sorted({(folder, prefix)
                    for folder in folders for suffix in SUFFIXES for prefix in nifti_files(folder, suffix)})
    cases = []
    for folder, prefix in scans:
        parts = folder.relative_to(source).parts
        split = parts[0] if parts and is_split_folder(parts[0]) else ""
        patient, *timepoint = prefix.split("_", 1)
        cases.append(SourceCase(
            case_id=safe_id(prefix), patient=f"{split}/{patient}",
            channels=(locate(folder, f"{prefix}_FLAIR.nii.gz"), locate(folder, f"{prefix}_T1.nii.gz")),
            mask=locate(folder, f"{prefix}_MASK.nii.gz"), role="test" if is_test_folder(split) else None,
            details={"split": split, "subject": patient, "timepoint": "".join(timepoint)}))
    return cases


DESCRIPTION = DatasetDescription(
    title="MSLesSeg",
    default_name="MSLesSeg",
    layout="train/PX/TY/PX_TY_{FLAIR,T1,MASK}.nii.gz (and a test folder)",
    discover=discover,
    reference="https://doi.org/10.1038/s41597-025-05250-y",
)

HELP = """Convert MSLesSeg 2024: train/PX/TY/PX_TY_{FLAIR,T1,MASK}.nii.gz, one case per patient and timepoint,
and the test folder's scans as the test set (found by their _FLAIR, _T1 and _MASK file names at any depth).
Case ids are the file prefixes, e.g. P1_T2."""

command = make_command(DESCRIPTION, HELP)
