"""`nnxai convert basel`: patient/visit folders to an nnU-Net raw dataset, with every bad-input case."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd

from fake_sources import AFFINE, case_ids, digest, lesion, load_splits, run_convert, save, save_case, verify_with_nnunet

FLAIR, T1, MASK = "flair_3d_sbr.nii.gz", "t1n_3d_sb.nii.gz", "lesion_mask_final.nii.gz"
DATASET = "Dataset005_Basel"


def basel_tree(root, patients=6, visits=2):
    """`patients` patients with `visits` visits each; the first visit of P00 stored as .nii, its mask labelled 2."""
    for p in range(patients):
        for v in range(visits):
            save_case(root / f"P{p:02d}" / f"V{v}", FLAIR, T1, MASK, seed=10 * p + v)
    first = root / "P00" / "V0"
    for name in (FLAIR, T1, MASK):
        image = nib.load(first / name)
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine), first / name.replace(".nii.gz", ".nii"))
        (first / name).unlink()
    save(first / "lesion_mask_final.nii", lesion(value=2))
    return root


def test_basel_writes_a_valid_patient_level_dataset(tmp_path, capfd):
    source = basel_tree(tmp_path / "basel")
    before = digest(source)
    result = run_convert("basel", source, tmp_path, "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "1")
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET

    train_val, test = case_ids(dataset / "labelsTr"), case_ids(dataset / "labelsTs")
    assert len(train_val) + len(test) == 12
    assert len(test) == 2 and len(train_val) == 10          # 6 patients: one for test, one for validation
    [fold] = load_splits(tmp_path, DATASET)
    assert sorted(fold["train"] + fold["val"]) == train_val and len(fold["val"]) == 2
    patient = lambda case: case.split("_")[0]
    assert len({patient(c) for c in fold["val"]}) == 1 and len({patient(c) for c in test}) == 1
    assert not {patient(c) for c in fold["train"]} & {patient(c) for c in fold["val"] + test}
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == sorted(
        f"{c}_{k:04d}.nii.gz" for c in test for k in (0, 1))

    content = json.loads((dataset / "dataset.json").read_text())
    assert content["channel_names"] == {"0": "FLAIR", "1": "T1"} and content["numTraining"] == 10
    assert content["labels"] == {"background": 0, "lesion": 1} and content["numTest"] == 2
    verify_with_nnunet(dataset, capfd)

    label_dir = "labelsTs" if "P00_V0" in test else "labelsTr"
    label = np.asanyarray(nib.load(dataset / label_dir / "P00_V0.nii.gz").dataobj)
    np.testing.assert_array_equal(label, lesion().astype(np.uint8))    # value 2 binarized to 1
    table = pd.read_csv(dataset / "nnxai_source_cases.csv").set_index("case_id")
    assert table.loc["P00_V0", "flair"] == str((source / "P00" / "V0" / "flair_3d_sbr.nii").resolve())
    assert table.loc["P03_V1", "mask"] == str((source / "P03" / "V1" / MASK).resolve())
    assert table.loc["P03_V1", "patient"] == "P03" and table.loc["P03_V1", "visit"] == "V1"
    assert sorted(table.index[table["set"] == "val"]) == sorted(fold["val"])
    assert digest(source) == before                          # the source is only read


def test_basel_rerun_is_idempotent_and_replaces_the_dataset(tmp_path):
    source = basel_tree(tmp_path / "basel", patients=4)
    assert run_convert("basel", source, tmp_path).exit_code == 0
    first = digest(tmp_path)
    (tmp_path / "raw" / DATASET / "imagesTr" / "stale_0000.nii.gz").write_text("left from before")
    assert run_convert("basel", source, tmp_path).exit_code == 0
    assert digest(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [DATASET]


def test_basel_file_names_are_options_and_link_mode_links_images(tmp_path, capfd):
    source = tmp_path / "basel"
    for p in range(3):
        save_case(source / f"P{p}" / "2020", "flair_brain.nii.gz", "t1n_brain.nii.gz", "mask.nii.gz", seed=p)
    shifted = np.array(AFFINE)
    shifted[0, 3] += 5e-4                                      # within the default tolerance of 1e-3
    save(source / "P0" / "2020" / "t1n_brain.nii.gz", affine=shifted)
    result = run_convert("basel", source, tmp_path, "--flair", "flair_brain.nii.gz", "--t1", "t1n_brain.nii.gz",
                         "--mask", "mask.nii.gz", "--link", "--test-fraction", "0", "--val-fraction", "0.3")
    assert result.exit_code == 0, result.output
    dataset = tmp_path / "raw" / DATASET
    images = dataset / "imagesTr"
    assert (images / "P1_2020_0000.nii.gz").resolve() == (source / "P1" / "2020" / "flair_brain.nii.gz").resolve()
    assert (images / "P1_2020_0001.nii.gz").is_symlink()
    resaved = images / "P0_2020_0001.nii.gz"
    assert not resaved.is_symlink()                            # put on the FLAIR's grid, so written
    flair = nib.load(source / "P0" / "2020" / "flair_brain.nii.gz")
    np.testing.assert_array_equal(nib.load(resaved).affine, flair.affine)
    np.testing.assert_array_equal(nib.load(resaved).header.get_qform(), flair.header.get_qform())
    assert not (dataset / "labelsTr" / "P1_2020.nii.gz").is_symlink()
    verify_with_nnunet(dataset, capfd)


def bad_cases(root):
    """Three good patients and one bad case of each kind, plus a lesion-free scan."""
    for p in range(3):
        save_case(root / f"good{p}" / "v1", FLAIR, T1, MASK, seed=p)
    save_case(root / "bad" / "no_t1", FLAIR, None, MASK)
    save_case(root / "bad" / "shape", FLAIR, None, MASK)
    save(root / "bad" / "shape" / T1, np.zeros((8, 8, 9), np.float32))
    save_case(root / "bad" / "affine", FLAIR, T1, None)
    save(root / "bad" / "affine" / MASK, lesion(), affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    save_case(root / "bad" / "not_nifti", FLAIR, None, MASK)
    (root / "bad" / "not_nifti" / T1).write_text("this is not an image")
    save_case(root / "bad" / "fractional", FLAIR, T1, MASK, mask_data=lesion(value=0.5))
    save_case(root / "empty" / "v1", FLAIR, T1, MASK, mask_data=lesion(empty=True))
    return root


EXPECTED_PROBLEMS = {
    "bad_no_t1": f"no_t1/{T1}: missing T1 (no such file)",
    "bad_shape": f"shape/{T1}: T1 shape (8, 8, 9) differs from the FLAIR's (8, 8, 8)",
    "bad_affine": f"affine/{MASK}: mask affine differs from the FLAIR's by 0.2 (tolerance 0.001)",
    "bad_not_nifti": f"not_nifti/{T1}: T1 is not a readable NIfTI file",
    "bad_fractional": f"fractional/{MASK}: not a binary mask (values such as 0.5 are not whole numbers)",
}


def test_basel_skips_bad_cases_with_one_line_reasons_and_keeps_empty_masks(tmp_path):
    source = bad_cases(tmp_path / "basel")
    result = run_convert("basel", source, tmp_path, "--test-fraction", "0", "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for case_id, problem in EXPECTED_PROBLEMS.items():
        [line] = [line for line in lines if line.strip().startswith(f"{case_id}:")]
        assert problem in line
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert f"empty/v1/{MASK}: empty mask (no lesion voxels), kept as a lesion-free scan" in warning
    dataset = tmp_path / "raw" / DATASET
    assert case_ids(dataset / "labelsTr") == ["empty_v1", "good0_v1", "good1_v1", "good2_v1"]
    table = pd.read_csv(dataset / "nnxai_source_cases.csv").set_index("case_id")
    assert sorted(table.index[table["set"] == "skipped"]) == sorted(EXPECTED_PROBLEMS)
    assert "missing T1" in table.loc["bad_no_t1", "note"]


def test_basel_skip_empty_masks_option(tmp_path):
    source = bad_cases(tmp_path / "basel")
    result = run_convert("basel", source, tmp_path, "--skip-empty-masks", "--test-fraction", "0")
    assert result.exit_code == 0, result.output
    assert "empty_v1: " in result.output and "skipped as asked" in result.output
    assert "empty_v1" not in case_ids(tmp_path / "raw" / DATASET / "labelsTr")


def test_basel_strict_writes_nothing_when_a_case_is_bad(tmp_path):
    source = bad_cases(tmp_path / "basel")
    result = run_convert("basel", source, tmp_path, "--strict")
    assert result.exit_code != 0
    assert "--strict: 5 case(s) would be skipped, nothing written" in result.output
    for case_id, problem in EXPECTED_PROBLEMS.items():
        assert f"  {case_id}: {source}/bad/{problem}" in result.output
    assert not (tmp_path / "raw").exists() and not (tmp_path / "preprocessed").exists()


def test_basel_fails_when_nothing_converts_or_the_folder_is_wrong(tmp_path):
    source = tmp_path / "basel"
    save_case(source / "P0" / "V0", FLAIR, None, MASK)
    result = run_convert("basel", source, tmp_path)
    assert result.exit_code != 0
    assert f"none of the 1 Basel cases could be converted; first problem: {source}/P0/V0/{T1}: missing T1" \
        in result.output
    assert not (tmp_path / "raw").exists()

    elsewhere = tmp_path / "wmh" / "training" / "Utrecht" / "0"
    save_case(elsewhere / "pre", "FLAIR.nii.gz", "T1.nii.gz", None)
    result = run_convert("basel", tmp_path / "wmh", tmp_path)
    assert result.exit_code != 0
    assert "no Basel cases found (expected <patient>/<visit>/ folders holding flair_3d_sbr.nii.gz" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_basel_unwritable_output_is_one_line_and_leaves_nothing(tmp_path):
    source = basel_tree(tmp_path / "basel", patients=3)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_convert("basel", source, tmp_path, "--raw-root", str(blocker / "raw"))
    assert result.exit_code != 0
    assert f"{blocker}/raw: cannot write the dataset there" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "preprocessed").exists()


def test_basel_output_inside_the_source_is_refused(tmp_path):
    source = basel_tree(tmp_path / "basel", patients=3)
    result = run_convert("basel", source, tmp_path, "--raw-root", str(source / "nnunet"))
    assert result.exit_code != 0 and "must not be inside the source folder" in result.output
