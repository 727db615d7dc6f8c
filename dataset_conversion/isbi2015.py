"""`nnxai convert isbi2015`: the ISBI 2015 longitudinal MS lesion challenge training data (SPEC section 7)."""
from __future__ import annotations

import re
from pathlib import Path

import click

from dataset_conversion.lesion_converter import DatasetDescription, SourceCase, locate, make_command, safe_id

RATERS = ("1", "2", "both")


def timepoints(subject_dir: Path) -> list[str]:
    """Timepoints named by any preprocessed image or mask of a subject, e.g. ["01", "02"]."""
    pattern = re.compile(rf"^{re.escape(subject_dir.name)}_(\d+)_(?:\w+_pp|mask\d)\.nii(?:\.gz)?$")
    names = [p.name for folder in ("preprocessed", "masks") for p in (subject_dir / folder).glob("*.nii*")]
    return sorted({match.group(1) for match in map(pattern.match, names) if match})


def discover(source: Path, rater: str = "1") -> list[SourceCase]:
    """One case per subject and timepoint (two with `rater="both"`, one per rater, same patient)."""
    cases = []
    for preprocessed in sorted(source.rglob("preprocessed")):
        subject_dir = preprocessed.parent
        subject = subject_dir.name
        if not preprocessed.is_dir() or not re.fullmatch(r"training\d+", subject):
            continue
        for timepoint in timepoints(subject_dir):
            stem = f"{subject}_{timepoint}"
            channels = (locate(preprocessed, f"{stem}_flair_pp.nii"), locate(preprocessed, f"{stem}_mprage_pp.nii"))
            for chosen in ("1", "2") if rater == "both" else (rater,):
                cases.append(SourceCase(
                    case_id=safe_id(subject, timepoint, f"rater{chosen}" if rater == "both" else ""),
                    patient=subject, channels=channels, mask=locate(subject_dir / "masks", f"{stem}_mask{chosen}.nii"),
                    details={"timepoint": timepoint, "rater": chosen}))
    return cases


DESCRIPTION = DatasetDescription(
    title="ISBI 2015",
    default_name="ISBI2015",
    layout="training/trainingXX/preprocessed/trainingXX_TT_{flair,mprage}_pp.nii and "
           "training/trainingXX/masks/trainingXX_TT_mask{1,2}.nii",
    discover=discover,
    reference="https://smart-stats-tools.org/lesion-challenge-2015",
)

HELP = """Convert the ISBI 2015 longitudinal challenge training data: trainingXX/preprocessed/
trainingXX_TT_{flair,mprage}_pp.nii (FLAIR, MPRAGE as channel 1) with trainingXX/masks/trainingXX_TT_mask{1,2}.nii,
one case per timepoint. --rater picks the rater's masks; "both" makes one case per rater (ids ..._rater1,
..._rater2) and keeps both in the same set. Test subjects have no public masks and are not read. Case ids
are trainingXX_TT."""

command = make_command(DESCRIPTION, HELP, [
    click.option("--rater", type=click.Choice(RATERS), default="1", show_default=True,
                 help="Whose masks to use; 'both' gives one training case per rater."),
])
