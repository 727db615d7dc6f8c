"""`nnxai convert msseg2016`: centers with overlapping patient numbers, a testing folder, a missing T1."""
from __future__ import annotations

import pandas as pd

from fake_sources import case_ids, digest, load_splits, run_convert, save_case, verify_with_nnunet

DATASET = "Dataset005_MSSEG2016"
FLAIR, T1 = "FLAIR_preprocessed.nii.gz", "T1_preprocessed.nii.gz"


def msseg_patient(folder, t1=T1, seed=0):
    save_case(folder / "Preprocessed_Data", FLAIR, t1, None, seed=seed)
    save_case(folder / "Preprocessed_Data", "T2_preprocessed.nii.gz", "DP_preprocessed.nii.gz", None, seed=seed)
    save_case(folder / "Masks", "ManualSegmentation_1.nii.gz", None, "Consensus.nii.gz", seed=seed)


def msseg_tree(root):
    for seed, patient in enumerate(["Center_01/Patient_01", "Center_01/Patient_02", "Center_03/Patient_01",
                                    "Center_03/Patient_02", "Center_07/Patient_01"]):
        msseg_patient(root / "Training" / patient, seed=seed)
    msseg_patient(root / "Training" / "Center_07" / "Patient_02", t1=None)
    msseg_patient(root / "Testing" / "Center_08" / "Patient_01", seed=9)
    return root


def test_msseg2016_converts_centers_and_the_testing_folder(tmp_path, capfd):
    source = msseg_tree(tmp_path / "msseg")
    before = digest(source)
    result = run_convert("msseg2016", source, tmp_path, "--seed", "4")
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET
    assert case_ids(dataset / "labelsTs") == ["test_Center_08_Patient_01"]
    assert case_ids(dataset / "labelsTr") == ["Center_01_Patient_01", "Center_01_Patient_02", "Center_03_Patient_01",
                                              "Center_03_Patient_02", "Center_07_Patient_01"]
    [fold] = load_splits(tmp_path, DATASET)
    assert len(fold["val"]) == 1 and len(fold["train"]) == 4
    verify_with_nnunet(dataset, capfd)
    assert (f"  Center_07_Patient_02: {source}/Training/Center_07/Patient_02/Preprocessed_Data/{T1}: "
            f"missing T1 (no such file)") in result.output
    table = pd.read_csv(dataset / "nnxai_source_cases.csv").set_index("case_id")
    assert table.loc["Center_03_Patient_01", "mask"] == str(
        source / "Training/Center_03/Patient_01/Masks/Consensus.nii.gz")
    assert table.loc["Center_07_Patient_02", "set"] == "skipped"

    assert run_convert("msseg2016", source, tmp_path, "--seed", "4").exit_code == 0
    assert digest(source) == before


def test_msseg2016_strict_and_other_folders(tmp_path):
    source = msseg_tree(tmp_path / "msseg")
    result = run_convert("msseg2016", source, tmp_path, "--strict")
    assert result.exit_code != 0 and "--strict: 1 case(s) would be skipped, nothing written" in result.output
    assert not (tmp_path / "raw").exists()
    result = run_convert("msseg2016", tmp_path / "msseg" / "Training" / "Center_01" / "Patient_01" / "Masks", tmp_path)
    assert result.exit_code != 0 and "no MSSEG-2016 cases found (expected <Center_XX>/<Patient_YY>/" in result.output
