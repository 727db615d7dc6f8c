"""`nnxai convert wmh2017`: sites with and without Amsterdam's scanner level, the ignore label, test set."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd

from fake_sources import case_ids, digest, lesion, load_splits, run_convert, save, save_case, verify_with_nnunet

DATASET = "Dataset005_WMH2017"


def wmh_label() -> np.ndarray:
    """A lesion (1) next to 'other pathology' (2)."""
    label = lesion()
    label[0:2, 0:2, 0:2] = 2
    return label


def wmh_tree(root):
    subjects = ["training/Utrecht/0", "training/Utrecht/2", "training/Singapore/50", "training/Singapore/51",
                "training/Amsterdam/GE3T/100", "training/Amsterdam/GE3T/101",
                "test/Amsterdam/GE1T5/137", "test/Utrecht/1"]
    for seed, subject in enumerate(subjects):
        save_case(root / subject / "pre", "FLAIR.nii.gz", "T1.nii.gz", None, seed=seed)
        save(root / subject / "wmh.nii.gz", wmh_label())
    save_case(root / "training/Singapore/52/pre", "FLAIR.nii.gz", "T1.nii.gz", None)
    save(root / "training/Singapore/52/wmh.nii.gz", np.zeros((8, 8, 9), np.float32))
    return root


def test_wmh2017_converts_sites_scanners_and_the_ignore_label(tmp_path, capfd):
    source = wmh_tree(tmp_path / "wmh")
    before = digest(source)
    result = run_convert("wmh2017", source, tmp_path)
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET
    assert case_ids(dataset / "labelsTs") == ["Amsterdam_GE1T5_137", "Utrecht_1"]
    assert case_ids(dataset / "labelsTr") == ["Amsterdam_GE3T_100", "Amsterdam_GE3T_101", "Singapore_50",
                                              "Singapore_51", "Utrecht_0", "Utrecht_2"]
    [fold] = load_splits(tmp_path, DATASET)
    assert len(fold["val"]) == 1 and sorted(fold["train"] + fold["val"]) == case_ids(dataset / "labelsTr")
    content = json.loads((dataset / "dataset.json").read_text())
    assert content["labels"] == {"background": 0, "lesion": 1, "ignore": 2}
    label = np.asanyarray(nib.load(dataset / "labelsTr" / "Amsterdam_GE3T_100.nii.gz").dataobj)
    np.testing.assert_array_equal(label, wmh_label())
    verify_with_nnunet(dataset, capfd)

    skipped = [line.strip() for line in result.output.splitlines() if line.startswith("  ")]
    assert skipped == [f"Singapore_52: {source}/training/Singapore/52/wmh.nii.gz: mask shape (8, 8, 9) differs "
                       f"from the FLAIR's (8, 8, 8)"]
    table = pd.read_csv(dataset / "nnxai_source_cases.csv", dtype=str, keep_default_na=False).set_index("case_id")
    assert table.loc["Amsterdam_GE3T_100", ["split", "site", "scanner", "subject"]].tolist() == [
        "training", "Amsterdam", "GE3T", "100"]
    assert table.loc["Utrecht_1", "set"] == "test" and table.loc["Utrecht_1", "scanner"] == ""

    assert run_convert("wmh2017", source, tmp_path).exit_code == 0
    assert digest(source) == before


def test_wmh2017_rejects_other_folders_and_bad_label_values(tmp_path):
    other = tmp_path / "msseg" / "Center_01" / "Patient_01" / "Preprocessed_Data"
    save_case(other, "FLAIR_preprocessed.nii.gz", "T1_preprocessed.nii.gz", None)
    result = run_convert("wmh2017", tmp_path / "msseg", tmp_path)
    assert result.exit_code != 0
    assert "no WMH 2017 cases found (expected <split>/<site>[/<scanner>]/<id>/pre/FLAIR.nii.gz" in result.output

    source = tmp_path / "wmh"
    save_case(source / "training/Utrecht/0/pre", "FLAIR.nii.gz", "T1.nii.gz", None)
    save(source / "training/Utrecht/0/wmh.nii.gz", lesion(value=3))
    result = run_convert("wmh2017", source, tmp_path)
    assert result.exit_code != 0
    assert "wmh.nii.gz: unexpected label values [3] (expected [0, 1, 2])" in result.output
    assert not (tmp_path / "raw").exists()
