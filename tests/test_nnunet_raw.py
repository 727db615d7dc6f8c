"""Writing nnU-Net raw datasets: atomic staging, file layout, dataset.json, splits and patient-level splitting."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from dataset_conversion.nnunet_raw import (
    CHANNEL_NAMES,
    LESION_LABELS,
    ConversionError,
    dataset_folder_name,
    patient_split,
    resolve_raw_root,
    staged_dataset,
    write_case,
    write_dataset_json,
    write_splits,
)


def volume(values: np.ndarray, spacing: float = 1.0) -> nib.Nifti1Image:
    return nib.Nifti1Image(values, np.diag([spacing, spacing, spacing, 1.0]))


def test_dataset_folder_name_pads_the_id_and_rejects_bad_names():
    assert dataset_folder_name(901, "MSPhantom") == "Dataset901_MSPhantom"
    assert dataset_folder_name(7, "Basel") == "Dataset007_Basel"
    with pytest.raises(ConversionError, match="between 1 and 999"):
        dataset_folder_name(1000, "X")
    with pytest.raises(ConversionError, match="letters, digits"):
        dataset_folder_name(5, "two words")


def test_resolve_raw_root_prefers_the_explicit_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "env"))
    assert resolve_raw_root(tmp_path / "given") == tmp_path / "given"
    assert resolve_raw_root(None) == tmp_path / "env"
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ConversionError, match="nnUNet_raw"):
        resolve_raw_root(None)


def test_staged_dataset_appears_only_when_complete_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "raw" / "Dataset001_A"
    with staged_dataset(target) as staging:
        assert staging.parent == target.parent and not target.exists()
        (staging / "first.txt").write_text("1")
    assert (target / "first.txt").read_text() == "1"
    with staged_dataset(target) as staging:
        (staging / "second.txt").write_text("2")
        assert (target / "first.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["second.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["Dataset001_A"]


def test_staged_dataset_leaves_nothing_and_keeps_the_old_dataset_on_error(tmp_path):
    target = tmp_path / "Dataset001_A"
    with staged_dataset(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dataset(target) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_A"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_staged_dataset_names_an_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConversionError, match=f"{locked}: cannot write"):
            with staged_dataset(locked / "Dataset001_A"):
                pass
    finally:
        locked.chmod(0o700)


def test_write_case_layout_copies_links_and_compresses(tmp_path):
    flair = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
    t1_nii = tmp_path / "t1.nii"
    nib.save(volume(flair * 2), t1_nii)
    flair_gz = tmp_path / "flair.nii.gz"
    nib.save(volume(flair), flair_gz)
    label = volume((flair > 500).astype(np.uint8))
    dataset = tmp_path / "ds"
    dataset.mkdir()

    write_case(dataset, "case_a", [flair_gz, t1_nii], label)
    write_case(dataset, "case_b", [flair_gz, t1_nii], label, test=True, link=True)
    write_case(dataset, "case_c", [volume(flair), volume(flair)], None, test=True)

    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["case_a_0000.nii.gz", "case_a_0001.nii.gz"]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["case_a.nii.gz"]
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [
        "case_b_0000.nii.gz", "case_b_0001.nii.gz", "case_c_0000.nii.gz", "case_c_0001.nii.gz"]
    assert sorted(p.name for p in (dataset / "labelsTs").iterdir()) == ["case_b.nii.gz"]
    copied = dataset / "imagesTr" / "case_a_0000.nii.gz"
    assert not copied.is_symlink() and copied.read_bytes() == flair_gz.read_bytes()
    linked = dataset / "imagesTs" / "case_b_0000.nii.gz"
    assert linked.is_symlink() and linked.resolve() == flair_gz.resolve()
    compressed = dataset / "imagesTs" / "case_b_0001.nii.gz"
    assert not compressed.is_symlink()
    np.testing.assert_array_equal(np.asanyarray(nib.load(compressed).dataobj), flair * 2)
    np.testing.assert_array_equal(np.asanyarray(nib.load(dataset / "labelsTr" / "case_a.nii.gz").dataobj),
                                  flair > 500)


def test_written_dataset_passes_nnunet_verification(tmp_path, capsys):
    dataset = tmp_path / dataset_folder_name(12, "Tiny")
    rng = np.random.default_rng(0)
    with staged_dataset(dataset) as staging:
        for index in range(2):
            label = np.zeros((8, 8, 8), np.uint8)
            label[2:4, 2:5, 3:6] = 1
            write_case(staging, f"tiny_{index:03d}",
                       [volume(rng.random((8, 8, 8)).astype(np.float32), 1.5) for _ in range(2)],
                       volume(label, 1.5))
        write_dataset_json(staging, 2, "Tiny", description="two tiny cases")

    content = json.loads((dataset / "dataset.json").read_text())
    assert content["channel_names"] == CHANNEL_NAMES == {"0": "FLAIR", "1": "T1"}
    assert content["labels"] == LESION_LABELS == {"background": 0, "lesion": 1}
    assert content["numTraining"] == 2
    assert content["file_ending"] == ".nii.gz"
    assert content["name"] == "Tiny" and content["description"] == "two tiny cases"
    verify_dataset_integrity(str(dataset), num_processes=1)
    assert "Error" not in capsys.readouterr().out


def test_write_splits_goes_to_the_preprocessed_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    splits = [{"train": ["a", "b"], "val": ["c"]}]
    path = write_splits("Dataset003_X", splits)
    assert path == tmp_path / "pre" / "Dataset003_X" / "splits_final.json"
    assert json.loads(path.read_text()) == splits
    assert [p.name for p in path.parent.iterdir()] == ["splits_final.json"]
    explicit = write_splits("Dataset003_X", splits, preprocessed_root=tmp_path / "other")
    assert explicit == tmp_path / "other" / "Dataset003_X" / "splits_final.json"
    with pytest.raises(ValueError, match="fold 0"):
        write_splits("Dataset003_X", [{"train": ["a"]}])
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(ConversionError, match="nnUNet_preprocessed"):
        write_splits("Dataset003_X", splits)


def cohort(num_patients: int, visits: int = 3) -> dict[str, str]:
    return {f"p{p:02d}_v{v}": f"p{p:02d}" for p in range(num_patients) for v in range(visits)}


def test_patient_split_never_splits_a_patient_and_covers_every_case():
    cases = cohort(20)
    split = patient_split(cases, val_fraction=0.2, test_fraction=0.25, seed=3)
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(cases)
    patients = {role: {cases[c] for c in ids} for role, ids in split.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert (len(patients["train"]), len(patients["val"]), len(patients["test"])) == (11, 4, 5)
    assert all(len(ids) == 3 * len(patients[role]) for role, ids in split.items())


def test_patient_split_is_deterministic_for_a_seed_and_varies_between_seeds():
    cases = cohort(30, visits=2)
    first = patient_split(cases, 0.2, 0.2, seed=7)
    assert first == patient_split(dict(reversed(list(cases.items()))), 0.2, 0.2, seed=7)
    assert first != patient_split(cases, 0.2, 0.2, seed=8)


def test_patient_split_small_cohorts_and_bad_fractions():
    small = patient_split(cohort(3, visits=1), 0.1, 0.1, seed=0)
    assert [len(small[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    assert patient_split(cohort(4), 0.0, 0.0, seed=0) == {"train": sorted(cohort(4)), "val": [], "test": []}
    with pytest.raises(ValueError, match="too few"):
        patient_split(cohort(2), 0.5, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"test fraction 1.0 must be in \[0, 1\)"):
        patient_split(cohort(5), 0.0, 1.0, seed=0)
