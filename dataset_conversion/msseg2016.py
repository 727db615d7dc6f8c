"""`nnxai convert msseg2016`: the MICCAI 2016 MS lesion challenge, MSSEG-1 (SPEC section 7)."""
from __future__ import annotations

from pathlib import Path

from dataset_conversion.lesion_converter import (
    DatasetDescription,
    SourceCase,
    is_test_folder,
    locate,
    make_command,
    safe_id,
)


def discover(source: Path) -> list[SourceCase]:
    """One case per `<Center_XX>/<Patient_YY>/` folder holding `Preprocessed_Data/`, at any depth."""
    cases = []
    for data_dir in sorted(source.rglob("Preprocessed_Data")):
        patient_dir = data_dir.parent
        parts = patient_dir.relative_to(source).parts
        if not data_dir.is_dir() or len(parts) < 2:
            continue
        center, patient = parts[-2:]
        is_test = any(is_test_folder(part) for part in parts)
        cases.append(SourceCase(
            case_id=safe_id("test" if is_test else "", center, patient), patient="/".join(parts),
            channels=(locate(data_dir, "FLAIR_preprocessed.nii.gz"), locate(data_dir, "T1_preprocessed.nii.gz")),
            mask=locate(patient_dir / "Masks", "Consensus.nii.gz"),
            role="test" if is_test else None, details={"center": center, "subject": patient}))
    return cases


DESCRIPTION = DatasetDescription(
    title="MSSEG-2016",
    default_name="MSSEG2016",
    layout="<Center_XX>/<Patient_YY>/Preprocessed_Data/FLAIR_preprocessed.nii.gz, T1_preprocessed.nii.gz "
           "and <Center_XX>/<Patient_YY>/Masks/Consensus.nii.gz",
    discover=discover,
    reference="https://portal.fli-iam.irisa.fr/msseg-challenge/",
)

HELP = """Convert MSSEG-2016: <Center_XX>/<Patient_YY>/Preprocessed_Data/{FLAIR,T1}_preprocessed.nii.gz with
the consensus mask Masks/Consensus.nii.gz, found at any depth below SOURCE. Patients below a folder named
like "Testing" form the test set. Case ids are Center_XX_Patient_YY (test_... for test patients)."""

command = make_command(DESCRIPTION, HELP)
