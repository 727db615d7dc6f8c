"""`nnxai convert wmh2017`: the WMH Segmentation Challenge 2017 (SPEC section 7)."""
from __future__ import annotations

from pathlib import Path

from dataset_conversion.lesion_converter import (
    DatasetDescription,
    SourceCase,
    is_split_folder,
    is_test_folder,
    locate,
    make_command,
    safe_id,
)

WMH_LABELS = {"background": 0, "lesion": 1, "ignore": 2}


def discover(source: Path) -> list[SourceCase]:
    """One case per `<split>/<site>[/<scanner>]/<id>/` folder holding `pre/`; Amsterdam has the scanner level."""
    cases = []
    for pre in sorted(source.rglob("pre")):
        case_dir = pre.parent
        parts = case_dir.relative_to(source).parts
        split = parts[0] if len(parts) > 2 and is_split_folder(parts[0]) else ""
        located = parts[1:] if split else parts
        if not pre.is_dir() or len(located) < 2:
            continue
        site, *scanner, subject = located
        cases.append(SourceCase(
            case_id=safe_id(site, *scanner, subject), patient="/".join((site, *scanner, subject)),
            channels=(locate(pre, "FLAIR.nii.gz"), locate(pre, "T1.nii.gz")), mask=locate(case_dir, "wmh.nii.gz"),
            role="test" if is_test_folder(split) else None,
            details={"split": split, "site": site, "scanner": "/".join(scanner), "subject": subject}))
    return cases


DESCRIPTION = DatasetDescription(
    title="WMH 2017",
    default_name="WMH2017",
    layout="<split>/<site>[/<scanner>]/<id>/pre/FLAIR.nii.gz, pre/T1.nii.gz and wmh.nii.gz",
    discover=discover,
    labels=WMH_LABELS,
    reference="https://wmh.isi.uu.nl",
)

HELP = """Convert the WMH Segmentation Challenge 2017: SOURCE/<split>/<site>[/<scanner>]/<id>/ with
pre/FLAIR.nii.gz, pre/T1.nii.gz and wmh.nii.gz (the Amsterdam site has the extra scanner level). Label 1
(white matter hyperintensity) is the lesion; label 2 (other pathology) becomes nnU-Net's "ignore" label, so
it is neither trained on nor scored. Cases under a test folder form the test set. Case ids are
SITE[_SCANNER]_ID; every subject is its own patient."""

command = make_command(DESCRIPTION, HELP)
