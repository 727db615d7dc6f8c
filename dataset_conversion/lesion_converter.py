"""One converter for every MS lesion dataset: find cases, check them, split by patient, write nnU-Net raw.

Each dataset module only says where its cases are (a `DatasetDescription` whose `discover` function lists
`SourceCase`s); checking, splitting, writing, the sidecar table and the command line are shared here.

Behaviour on bad input (the same for every dataset):
- a folder with no file of the expected layout is not the named dataset: an error saying what was
  expected, nothing written;
- a bad case (missing channel or mask, not a readable NIfTI file, not 3D, shapes or affines that disagree
  with the FLAIR's, a mask with fractional, negative or unexpected values) is skipped, with a one-line
  reason naming the file, listed at the end and in the sidecar table;
- the exit status is non-zero, and nothing is written, when no case could be converted, or when any
  case was skipped and `--strict` was given;
- an empty mask is a lesion-free scan, which is legitimate: the case is kept with a warning
  (`--skip-empty-masks` skips it instead).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import click
import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from dataset_conversion.nnunet_raw import (
    CHANNEL_NAMES,
    LESION_LABELS,
    ConversionError,
    dataset_folder_name,
    patient_split,
    resolve_preprocessed_root,
    resolve_raw_root,
    staged_dataset,
    write_case,
    write_dataset_json,
    write_splits,
)

ROLES = ("train", "val", "test")
SIDECAR_NAME = "nnxai_source_cases.csv"
DEFAULT_AFFINE_TOLERANCE = 1e-3
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class SourceCase:
    """One case as found in a source tree; its files need not exist (a missing one is reported)."""

    case_id: str                  # name in the nnU-Net dataset
    patient: str                  # all cases of a patient land in the same set
    channels: tuple[Path, ...]    # FLAIR, then T1/MPRAGE
    mask: Path
    role: str | None = None       # "train", "val" or "test" when the source fixes it; None: split by patient
    details: dict[str, str] = field(default_factory=dict)   # extra sidecar columns (site, visit, rater, ...)


@dataclass(frozen=True)
class DatasetDescription:
    """What differs between datasets: their name, layout and where the cases are."""

    title: str                    # "WMH 2017", used in messages
    default_name: str             # nnU-Net dataset name, e.g. "WMH2017"
    layout: str                   # expected layout, shown when a folder is not this dataset
    discover: Callable[..., list[SourceCase]]   # discover(source, **dataset_options)
    labels: dict[str, int] = field(default_factory=lambda: dict(LESION_LABELS))
    reference: str = ""


@dataclass
class CaseOutcome:
    """The result of checking one case: a reason to skip it, or a warning, or neither."""

    case: SourceCase
    problem: str | None = None
    warning: str | None = None
    role: str | None = None


@dataclass
class ConversionReport:
    """What a conversion did, for the command line and for tests."""

    dataset_dir: Path
    splits_path: Path
    outcomes: list[CaseOutcome]

    @property
    def converted(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.problem is None]

    @property
    def skipped(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.problem is not None]

    def case_ids(self, role: str) -> list[str]:
        return [o.case.case_id for o in self.converted if o.role == role]


class NothingWritten(ConversionError):
    """The conversion stopped before writing because of its cases; `report` lists them."""

    def __init__(self, message: str, report: ConversionReport):
        super().__init__(message)
        self.report = report


class CaseProblem(Exception):
    """A reason to skip one case, already phrased as 'FILE: problem'."""


def safe_id(*parts: str) -> str:
    """A case id from path parts: characters other than letters, digits, '-' and '_' become '-'."""
    return "_".join(re.sub(r"[^A-Za-z0-9_-]", "-", part) for part in parts if part)


def is_test_folder(name: str) -> bool:
    """Whether a source folder holds a test set ("test", "Testing", ...)."""
    return "test" in name.lower()


def is_split_folder(name: str) -> bool:
    """Whether a source folder is a training or test set level ("training", "train", "Testing", ...)."""
    return "train" in name.lower() or is_test_folder(name)


def nifti_stem(name: str) -> str:
    """A file name without its .nii/.nii.gz ending."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def locate(folder: Path, name: str) -> Path:
    """`folder/name`, or its .nii/.nii.gz twin if only that exists (the missing path when neither does)."""
    stem = nifti_stem(name)
    if stem != name:
        for ending in NIFTI_ENDINGS:
            if (folder / f"{stem}{ending}").exists():
                return folder / f"{stem}{ending}"
    return folder / name


def nifti_files(folder: Path, suffix: str) -> dict[str, Path]:
    """Files in `folder` named PREFIX + suffix + .nii(.gz), keyed by PREFIX."""
    found = {}
    for ending in reversed(NIFTI_ENDINGS):   # .nii.gz wins when both exist
        for path in folder.glob(f"*{suffix}{ending}"):
            found[path.name[: -len(suffix + ending)]] = path
    return found


def load_volume(path: Path, what: str) -> nib.Nifti1Image:
    """Open a 3D NIfTI volume, or raise a CaseProblem naming the file and what is wrong with it."""
    if not path.exists():
        raise CaseProblem(f"{path}: missing {what} (no such file)")
    if not path.name.endswith(NIFTI_ENDINGS):
        raise CaseProblem(f"{path}: {what} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as error:   # nibabel, gzip and numpy raise many kinds for a broken file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CaseProblem(f"{path}: {what} is not a readable NIfTI file ({reason})") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseProblem(f"{path}: {what} is not a NIfTI file ({type(image).__name__})")
    if data.ndim != 3:
        raise CaseProblem(f"{path}: {what} must be a 3D volume, found shape {data.shape}")
    if not np.isfinite(data).all():
        raise CaseProblem(f"{path}: {what} contains NaN or infinite values")
    return image


def check_geometry(path: Path, image: nib.Nifti1Image, what: str, flair: nib.Nifti1Image, tolerance: float) -> None:
    """Raise a CaseProblem when `image` is not on the FLAIR's voxel grid (shape, affine within `tolerance`)."""
    if image.shape != flair.shape:
        raise CaseProblem(f"{path}: {what} shape {image.shape} differs from the FLAIR's {flair.shape}")
    difference = float(np.abs(image.affine - flair.affine).max())
    if difference > tolerance:
        raise CaseProblem(f"{path}: {what} affine differs from the FLAIR's by {difference:.3g} "
                          f"(tolerance {tolerance:g})")


def mask_to_label(path: Path, mask: nib.Nifti1Image, labels: dict[str, int]) -> np.ndarray:
    """Label array for nnU-Net: lesion masks binarized (>= 1); datasets with more labels keep their values.

    Fractional or negative values mean the file is not a label mask (e.g. resampled with interpolation).
    """
    data = np.asanyarray(mask.dataobj)
    values = np.unique(data)
    if (values < 0).any():
        raise CaseProblem(f"{path}: not a binary mask (negative values such as {values.min():g})")
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise CaseProblem(f"{path}: not a binary mask (values such as {fractional[0]:g} are not whole numbers)")
    if labels == LESION_LABELS:
        return (data >= 1).astype(np.uint8)
    unexpected = sorted(set(values.astype(int).tolist()) - set(labels.values()))
    if unexpected:
        raise CaseProblem(f"{path}: unexpected label values {unexpected} (expected {sorted(labels.values())})")
    return data.astype(np.uint8)


def lesion_values(labels: dict[str, int]) -> list[int]:
    """Label values that are lesions: all but background and nnU-Net's ignore label."""
    return [value for name, value in labels.items() if name not in ("background", "ignore")]


def on_flair_grid(data: np.ndarray, flair: nib.Nifti1Image, dtype: type) -> nib.Nifti1Image:
    """`data` as an image with exactly the FLAIR's geometry (qform, sform, zooms), so nnU-Net sees one grid."""
    header = flair.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    image = nib.Nifti1Image(data.astype(dtype), flair.affine, header)
    image.set_qform(*flair.get_qform(coded=True))
    image.set_sform(*flair.get_sform(coded=True))
    return image


def check_case(case: SourceCase, labels: dict[str, int], tolerance: float, skip_empty: bool) -> CaseOutcome:
    """Check one case without writing anything."""
    try:
        flair = load_volume(case.channels[0], CHANNEL_NAMES["0"])
        for index, path in enumerate(case.channels[1:], start=1):
            what = CHANNEL_NAMES[str(index)]
            check_geometry(path, load_volume(path, what), what, flair, tolerance)
        mask = load_volume(case.mask, "mask")
        check_geometry(case.mask, mask, "mask", flair, tolerance)
        label = mask_to_label(case.mask, mask, labels)
    except CaseProblem as problem:
        return CaseOutcome(case, problem=str(problem))
    if not np.isin(label, lesion_values(labels)).any():
        message = f"{case.mask}: empty mask (no lesion voxels)"
        if skip_empty:
            return CaseOutcome(case, problem=f"{message}, skipped as asked")
        return CaseOutcome(case, warning=f"{message}, kept as a lesion-free scan")
    return CaseOutcome(case)


def write_checked_case(dataset_dir: Path, outcome: CaseOutcome, labels: dict[str, int], link: bool) -> None:
    """Write a case that passed `check_case`: the FLAIR as is, other channels as is when already on the
    FLAIR's grid (else re-saved on it), the label always re-saved on the FLAIR's grid."""
    case = outcome.case
    flair = nib.load(case.channels[0])
    images: list[nib.Nifti1Image | Path] = [case.channels[0]]
    for path in case.channels[1:]:
        image = nib.load(path)
        if np.array_equal(image.affine, flair.affine):
            images.append(path)
        else:
            data = np.asanyarray(image.dataobj)
            images.append(on_flair_grid(data, flair, data.dtype))
    label = on_flair_grid(mask_to_label(case.mask, nib.load(case.mask), labels), flair, np.uint8)
    write_case(dataset_dir, case.case_id, images, label, test=outcome.role == "test", link=link)


def assign_roles(outcomes: list[CaseOutcome], val_fraction: float, test_fraction: float | None, seed: int) -> None:
    """Give each good case its set: the source's own where it has one, else a patient-level random split.

    Without an explicit test fraction, cases are held out for testing only if the source has no test set.
    """
    good = [o for o in outcomes if o.problem is None]
    if test_fraction is None:
        source_has_test = any(o.case.role == "test" for o in good)
        test_fraction = 0.0 if source_has_test else DEFAULT_TEST_FRACTION
    pool = {o.case.case_id: o.case.patient for o in good if o.case.role is None}
    split: dict[str, list[str]] = {role: [] for role in ROLES}
    if pool:
        try:
            split = patient_split(pool, val_fraction, test_fraction, seed)
        except ValueError as error:
            raise ConversionError(f"cannot split the cases by patient: {error}") from error
    role_of_case = {case_id: role for role, ids in split.items() for case_id in ids}
    for outcome in good:
        outcome.role = outcome.case.role or role_of_case[outcome.case.case_id]


def sidecar_table(report: ConversionReport) -> pd.DataFrame:
    """One row per source case: new id, set, patient, dataset details, source files, status and reason."""
    rows = []
    for outcome in report.outcomes:
        case = outcome.case
        rows.append({
            "case_id": case.case_id,
            "set": outcome.role if outcome.problem is None else "skipped",
            "patient": case.patient,
            **case.details,
            **{CHANNEL_NAMES[str(i)].lower(): str(path.resolve()) for i, path in enumerate(case.channels)},
            "mask": str(case.mask.resolve()),
            "note": outcome.problem or outcome.warning or "",
        })
    return pd.DataFrame(rows)


def _check_unique_ids(cases: Sequence[SourceCase]) -> None:
    seen: dict[str, SourceCase] = {}
    for case in cases:
        if case.case_id in seen:
            raise ConversionError(f"{case.mask.parent}: case id {case.case_id!r} is also used by "
                                  f"{seen[case.case_id].mask.parent}; rename one of the folders")
        seen[case.case_id] = case


def convert_dataset(description: DatasetDescription, source: Path, dataset_id: int, name: str | None = None,
                    val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float | None = None, seed: int = 0,
                    raw_root: Path | None = None, preprocessed_root: Path | None = None, link: bool = False,
                    strict: bool = False, skip_empty_masks: bool = False,
                    affine_tolerance: float = DEFAULT_AFFINE_TOLERANCE, **dataset_options) -> ConversionReport:
    """Convert a source tree to $nnUNet_raw/DatasetNNN_Name plus a patient-level splits_final.json.

    The source is only read. The dataset appears atomically and a re-run replaces it with the same result.
    Raises ConversionError (nothing written) when the folder is not this dataset, when no case is usable,
    or when `strict` and some case was skipped.
    """
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"{source}: not a folder")
    folder_name = dataset_folder_name(dataset_id, name or description.default_name)
    dataset_dir = resolve_raw_root(raw_root) / folder_name
    preprocessed_root = resolve_preprocessed_root(preprocessed_root)
    if dataset_dir.resolve().is_relative_to(source.resolve()):
        raise ConversionError(f"{dataset_dir}: the output must not be inside the source folder {source}")

    cases = description.discover(source, **dataset_options)
    if not any(path.exists() for case in cases for path in (*case.channels, case.mask)):
        raise ConversionError(f"{source}: no {description.title} cases found (expected {description.layout})")
    _check_unique_ids(cases)
    outcomes = [check_case(case, description.labels, affine_tolerance, skip_empty_masks)
                for case in tqdm(cases, desc="checking cases", unit="case", disable=None)]
    report = ConversionReport(dataset_dir, preprocessed_root / folder_name / "splits_final.json", outcomes)
    if not report.converted:
        raise NothingWritten(f"{source}: none of the {len(cases)} {description.title} cases could be converted; "
                             f"first problem: {report.skipped[0].problem}", report)
    if strict and report.skipped:
        raise NothingWritten(f"--strict: {len(report.skipped)} case(s) would be skipped, nothing written; "
                             f"first problem: {report.skipped[0].problem}", report)
    assign_roles(outcomes, val_fraction, test_fraction, seed)
    if not report.case_ids("val"):
        raise ConversionError(f"{source}: no validation cases for nnU-Net's fold 0")

    with staged_dataset(dataset_dir) as staging:
        for outcome in tqdm(report.converted, desc="writing cases", unit="case", disable=None):
            write_checked_case(staging, outcome, description.labels, link)
        write_dataset_json(staging, len(report.case_ids("train")) + len(report.case_ids("val")), folder_name,
                           labels=description.labels, reference=description.reference or None,
                           description=f"{description.title} converted by nnxai from {source.resolve()}",
                           numTest=len(report.case_ids("test")))
        sidecar_table(report).to_csv(staging / SIDECAR_NAME, index=False)
    write_splits(folder_name, [{"train": report.case_ids("train"), "val": report.case_ids("val")}],
                 preprocessed_root)
    return report


def print_report(report: ConversionReport) -> None:
    """Summary, then every warning and skipped case on one line each."""
    counts = ", ".join(f"{role} {len(report.case_ids(role))}" for role in ROLES)
    click.echo(f"converted {len(report.converted)} of {len(report.outcomes)} cases ({counts}) to {report.dataset_dir}")
    click.echo(f"splits: {report.splits_path}; case table: {report.dataset_dir / SIDECAR_NAME}")
    for outcome in report.converted:
        if outcome.warning:
            click.echo(f"warning: {outcome.warning}", err=True)
    print_skipped(report)


def print_skipped(report: ConversionReport) -> None:
    if report.skipped:
        click.echo(f"skipped cases ({len(report.skipped)}):", err=True)
        for outcome in report.skipped:
            click.echo(f"  {outcome.case.case_id}: {outcome.problem}", err=True)


COMMON_HELP = """
Channel 0 is FLAIR, channel 1 T1/MPRAGE. Writes $nnUNet_raw/DatasetNNN_NAME (imagesTr, labelsTr, imagesTs,
labelsTs, dataset.json and nnxai_source_cases.csv, mapping new case ids to source files) and
$nnUNet_preprocessed/DatasetNNN_NAME/splits_final.json whose fold 0 validates on the validation cases.
Train and validation cases go to imagesTr, test cases to imagesTs. Splits never separate a patient's scans;
fractions count patients. Sources are only read; a re-run replaces the dataset with the same result.

A case with a missing or unreadable file, shapes or affines that disagree with the FLAIR's, or a mask
with fractional or negative values is skipped with a one-line reason. An empty mask is a lesion-free scan
and is kept with a warning (--skip-empty-masks skips it). The exit status is non-zero, and nothing is
written, if no case could be converted or if --strict is given and any case was skipped.
"""


def make_command(description: DatasetDescription, help_text: str,
                 dataset_options: Sequence[Callable] = ()) -> click.Command:
    """The `nnxai convert NAME` click command for a dataset; `dataset_options` are extra click options
    whose values are passed to the dataset's discover function."""

    def run(**options) -> None:
        try:
            report = convert_dataset(description, **options)
        except NothingWritten as failure:
            print_skipped(failure.report)
            raise
        print_report(report)

    command = run
    for option in reversed(dataset_options):
        command = option(command)
    for option in reversed(_common_options()):
        command = option(command)
    return click.command(help=help_text.strip() + "\n\n" + COMMON_HELP.strip())(command)


def _common_options() -> list[Callable]:
    return [
        click.argument("source", type=click.Path(file_okay=False, path_type=Path)),
        click.option("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)."),
        click.option("--name", default=None, help="Dataset name after the id (default: the dataset's own)."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=DEFAULT_VAL_FRACTION, show_default=True,
                     help="Share of patients (without a set fixed by the source) used for validation."),
        click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Share of patients held out for testing [default: 0.2, or 0 when the source "
                          "has its own test set]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the patient split."),
        click.option("--raw-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="nnU-Net raw folder [default: $nnUNet_raw]."),
        click.option("--preprocessed-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Where splits_final.json goes [default: $nnUNet_preprocessed]."),
        click.option("--link", is_flag=True,
                     help="Symlink .nii.gz images already on the FLAIR's grid instead of copying them "
                          "(masks are always written, binarized)."),
        click.option("--strict", is_flag=True, help="Fail, writing nothing, if any case would be skipped."),
        click.option("--skip-empty-masks", is_flag=True, help="Skip cases whose mask has no lesion voxel."),
        click.option("--affine-tolerance", type=click.FloatRange(0), default=DEFAULT_AFFINE_TOLERANCE,
                     show_default=True,
                     help="Largest difference between affine entries (mm) still counted as the same grid; "
                          "channels and masks within it are written on the FLAIR's grid."),
    ]
