"""`nnxai convert shifts`: sites and splits kept in case ids and the case table, Shifts' own splits, no T1."""
from __future__ import annotations

import pandas as pd

from fake_sources import case_ids, digest, lesion, load_splits, run_convert, save, verify_with_nnunet

DATASET = "Dataset005_ShiftsMS"


def shifts_scan(split_dir, scan, seed, t1=True):
    save(split_dir / "flair" / f"{scan}_FLAIR_isovox.nii.gz", seed=seed)
    if t1:
        save(split_dir / "t1" / f"{scan}_T1_isovox.nii.gz", seed=seed + 1)
    save(split_dir / "gt" / f"{scan}_gt_isovox.nii.gz", lesion())
    save(split_dir / "fg_mask" / f"{scan}_isovox_fg_mask.nii.gz", lesion())


def shifts_tree(root):
    layout = {"msseg/train": ["1", "2", "3"], "best/train": ["10", "11"], "msseg/dev_in": ["4"],
              "best/dev_in": ["12"], "best/eval_in": ["13"], "ljubljana/dev_out": ["1", "2"]}
    for seed, (split_dir, scans) in enumerate(layout.items()):
        for scan in scans:
            shifts_scan(root / "shifts_ms_pt1" / split_dir, scan, seed=seed)
    shifts_scan(root / "shifts_ms_pt1" / "best" / "train", "14", seed=0, t1=False)
    return root


def test_shifts_uses_its_own_splits_and_keeps_sites_in_names(tmp_path, capfd):
    source = shifts_tree(tmp_path / "shifts")
    before = digest(source)
    result = run_convert("shifts", source, tmp_path)
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET
    assert case_ids(dataset / "labelsTs") == ["best_eval_in_13", "ljubljana_dev_out_1", "ljubljana_dev_out_2"]
    [fold] = load_splits(tmp_path, DATASET)
    assert fold == {"train": ["best_train_10", "best_train_11", "msseg_train_1", "msseg_train_2", "msseg_train_3"],
                    "val": ["best_dev_in_12", "msseg_dev_in_4"]}
    verify_with_nnunet(dataset, capfd)
    assert (f"  best_train_14: {source}/shifts_ms_pt1/best/train/t1/14_T1_isovox.nii.gz: missing T1 "
            f"(no such file)") in result.output
    table = pd.read_csv(dataset / "nnxai_source_cases.csv", dtype=str).set_index("case_id")
    assert table.loc["ljubljana_dev_out_2", ["site", "split", "subject", "set"]].tolist() == [
        "ljubljana", "dev_out", "2", "test"]
    assert run_convert("shifts", source, tmp_path).exit_code == 0
    assert digest(source) == before


def test_shifts_without_a_validation_split_or_usable_case(tmp_path):
    source = tmp_path / "shifts"
    shifts_scan(source / "msseg" / "train", "1", seed=0)
    result = run_convert("shifts", source, tmp_path)
    assert result.exit_code != 0 and "no validation cases for nnU-Net's fold 0" in result.output
    (source / "msseg" / "train" / "t1" / "1_T1_isovox.nii.gz").unlink()
    result = run_convert("shifts", source, tmp_path)
    assert result.exit_code != 0
    assert "none of the 1 Shifts 2.0 MS cases could be converted; first problem:" in result.output
    assert not (tmp_path / "raw").exists()
