"""`nnxai convert mslesseg`: PX/TY timepoints, T2 files that are not channels, a test folder, a missing T1."""
from __future__ import annotations

import pandas as pd

from fake_sources import case_ids, digest, load_splits, run_convert, save, save_case, verify_with_nnunet

DATASET = "Dataset005_MSLesSeg"


def mslesseg_scan(folder, prefix, seed, t1=True):
    save_case(folder, f"{prefix}_FLAIR.nii.gz", f"{prefix}_T1.nii.gz" if t1 else None, f"{prefix}_MASK.nii.gz",
              seed=seed)
    save(folder / f"{prefix}_T2.nii.gz", seed=seed + 2)


def mslesseg_tree(root):
    visits = {"P1": 3, "P2": 2, "P3": 1, "P4": 1, "P5": 2}
    for patient, count in visits.items():
        for t in range(1, count + 1):
            mslesseg_scan(root / "train" / patient / f"T{t}", f"{patient}_T{t}", seed=t)
    mslesseg_scan(root / "train" / "P6" / "T1", "P6_T1", seed=0, t1=False)
    mslesseg_scan(root / "test" / "P54" / "T1", "P54_T1", seed=5)
    return root


def test_mslesseg_keeps_timepoints_of_a_patient_together(tmp_path, capfd):
    source = mslesseg_tree(tmp_path / "mslesseg")
    before = digest(source)
    result = run_convert("mslesseg", source, tmp_path, "--val-fraction", "0.4", "--seed", "2")
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET
    assert case_ids(dataset / "labelsTs") == ["P54_T1"]
    assert case_ids(dataset / "labelsTr") == ["P1_T1", "P1_T2", "P1_T3", "P2_T1", "P2_T2", "P3_T1", "P4_T1",
                                              "P5_T1", "P5_T2"]
    [fold] = load_splits(tmp_path, DATASET)
    val_patients = {case.split("_")[0] for case in fold["val"]}
    assert len(val_patients) == 2                            # 0.4 of 5 patients
    assert not val_patients & {case.split("_")[0] for case in fold["train"]}
    verify_with_nnunet(dataset, capfd)
    assert f"  P6_T1: {source}/train/P6/T1/P6_T1_T1.nii.gz: missing T1 (no such file)" in result.output
    table = pd.read_csv(dataset / "nnxai_source_cases.csv", dtype=str).set_index("case_id")
    assert table.loc["P1_T3", ["split", "subject", "timepoint"]].tolist() == ["train", "P1", "T3"]
    assert table.loc["P1_T3", "t1"] == str(source / "train/P1/T3/P1_T3_T1.nii.gz")

    assert run_convert("mslesseg", source, tmp_path, "--val-fraction", "0.4", "--seed", "2").exit_code == 0
    assert digest(source) == before


def test_mslesseg_other_folder_is_named(tmp_path):
    save_case(tmp_path / "basel" / "P1" / "V1", "flair_3d_sbr.nii.gz", "t1n_3d_sb.nii.gz", "lesion_mask_final.nii.gz")
    result = run_convert("mslesseg", tmp_path / "basel", tmp_path)
    assert result.exit_code != 0
    assert "no MSLesSeg cases found (expected train/PX/TY/PX_TY_{FLAIR,T1,MASK}.nii.gz" in result.output
