"""`nnxai convert isbi2015`: timepoints as cases, .nii inputs, two raters, a missing MPRAGE."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from fake_sources import case_ids, digest, lesion, load_splits, run_convert, save, verify_with_nnunet

DATASET = "Dataset005_ISBI2015"


def rater_mask(rater: int) -> np.ndarray:
    """Rater 1 marks one lesion, rater 2 a shifted one, so the chosen rater is visible in the label."""
    return np.roll(lesion(), rater, axis=0)


def isbi_tree(root):
    timepoints = {1: 2, 2: 1, 3: 3, 4: 2, 5: 1}
    for subject, count in timepoints.items():
        folder = root / "training" / f"training{subject:02d}"
        for t in range(1, count + 1):
            stem = f"training{subject:02d}_{t:02d}"
            for seed, modality in enumerate(("flair", "mprage", "pd", "t2")):
                if stem != "training03_03" or modality != "mprage":
                    save(folder / "preprocessed" / f"{stem}_{modality}_pp.nii", seed=10 * subject + t + seed)
            for rater in (1, 2):
                save(folder / "masks" / f"{stem}_mask{rater}.nii", rater_mask(rater))
    return root


def test_isbi2015_one_case_per_timepoint_with_both_raters_in_one_set(tmp_path, capfd):
    source = isbi_tree(tmp_path / "isbi")
    before = digest(source)
    result = run_convert("isbi2015", source, tmp_path, "--rater", "both", "--test-fraction", "0.2")
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET
    cases = case_ids(dataset / "labelsTr") + case_ids(dataset / "labelsTs")
    assert len(cases) == 2 * (2 + 1 + 2 + 2 + 1)            # training03_03 lacks its MPRAGE
    assert "training01_02_rater1" in cases and "training01_02_rater2" in cases
    [fold] = load_splits(tmp_path, DATASET)
    sets = {"train": fold["train"], "val": fold["val"], "test": case_ids(dataset / "labelsTs")}
    subject_sets = {}
    for role, ids in sets.items():
        for case in ids:
            subject_sets.setdefault(case.split("_")[0], set()).add(role)
    assert all(len(roles) == 1 for roles in subject_sets.values()) and len(subject_sets) == 5
    rater2 = next((dataset / f"labels{s}" / "training01_01_rater2.nii.gz") for s in ("Tr", "Ts")
                  if (dataset / f"labels{s}" / "training01_01_rater2.nii.gz").exists())
    np.testing.assert_array_equal(np.asanyarray(nib.load(rater2).dataobj), rater_mask(2))
    verify_with_nnunet(dataset, capfd)
    for rater in (1, 2):
        assert (f"  training03_03_rater{rater}: {source}/training/training03/preprocessed/"
                f"training03_03_mprage_pp.nii: missing T1 (no such file)") in result.output
    assert digest(source) == before


def test_isbi2015_single_rater_and_wrong_geometry(tmp_path):
    source = isbi_tree(tmp_path / "isbi")
    save(source / "training/training05/masks/training05_01_mask2.nii", lesion(), affine=np.diag([2.0, 1, 1, 1]))
    result = run_convert("isbi2015", source, tmp_path, "--rater", "2")
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET
    cases = case_ids(dataset / "labelsTr") + case_ids(dataset / "labelsTs")
    assert sorted(cases) == ["training01_01", "training01_02", "training02_01", "training03_01", "training03_02",
                             "training04_01", "training04_02"]
    label = next(dataset.glob("labels*/training01_01.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(nib.load(label).dataobj), rater_mask(2))
    assert "training05_01_mask2.nii: mask affine differs from the FLAIR's by 1" in result.output
