"""`nnxai convert basel`: the Basel MS cohort, one folder per patient and visit (SPEC section 7)."""
from __future__ import annotations

from pathlib import Path

import click

from dataset_conversion.lesion_converter import DatasetDescription, SourceCase, locate, make_command, safe_id

DEFAULT_FLAIR = "flair_3d_sbr.nii.gz"
DEFAULT_T1 = "t1n_3d_sb.nii.gz"
DEFAULT_MASK = "lesion_mask_final.nii.gz"


def discover(source: Path, flair: str = DEFAULT_FLAIR, t1: str = DEFAULT_T1,
             mask: str = DEFAULT_MASK) -> list[SourceCase]:
    """One case per `<source>/<patient>/<visit>/` folder; the patient folder is the patient."""
    cases = []
    for visit_dir in sorted(source.glob("*/*")):
        patient, visit = visit_dir.parent.name, visit_dir.name
        if not visit_dir.is_dir() or patient.startswith(".") or visit.startswith("."):
            continue
        cases.append(SourceCase(
            case_id=safe_id(patient, visit), patient=patient,
            channels=(locate(visit_dir, flair), locate(visit_dir, t1)), mask=locate(visit_dir, mask),
            details={"visit": visit}))
    return cases


DESCRIPTION = DatasetDescription(
    title="Basel",
    default_name="Basel",
    layout=f"<patient>/<visit>/ folders holding {DEFAULT_FLAIR}, {DEFAULT_T1} and {DEFAULT_MASK}, "
           f"or the names given with --flair, --t1 and --mask",
    discover=discover,
)

HELP = """Convert the Basel MS cohort: SOURCE/<patient>/<visit>/ with a skull-stripped FLAIR (registered to
the T1), the T1 and a lesion mask (binarized as >= 1). File names are options; .nii is accepted for .nii.gz.
Case ids are PATIENT_VISIT."""

command = make_command(DESCRIPTION, HELP, [
    click.option("--flair", default=DEFAULT_FLAIR, show_default=True,
                 help="FLAIR file name in each visit folder (newer exports: flair_brain.nii.gz)."),
    click.option("--t1", default=DEFAULT_T1, show_default=True,
                 help="T1 file name in each visit folder (newer exports: t1n_brain.nii.gz)."),
    click.option("--mask", default=DEFAULT_MASK, show_default=True, help="Lesion mask file name."),
])
