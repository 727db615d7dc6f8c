"""Phantom MS cohort: determinism, a valid nnU-Net dataset, lesions in white matter, contrasts, geometry, errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from dataset_conversion.nnunet_raw import ConversionError
from dataset_conversion.phantom import (LESION_TABLE, LESION_WM_PROBABILITY, MAX_LESIONS, MIN_LESION_VOXELS,
                                        _draw_lesion_count, command, load_template, make_phantom_cohort,
                                        smooth_random_field, synthesize_subject)
from nnxai.lesions.synthesis import apply_lesion_contrast, lesion_blob

COHORT_SPACING = 3.0  # coarse, so a whole cohort is written in about a second


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def subject():
    """Case 0 of seed 0 at the default 2 mm: 30 lesions."""
    return synthesize_subject(load_template(2.0), np.random.default_rng([0, 0]))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_phantom_cohort(tmp_path_factory.mktemp("raw"), cases=4, seed=3, spacing=COHORT_SPACING,
                               test_fraction=0.25)


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(cohort, tmp_path):
    again = make_phantom_cohort(tmp_path / "again", cases=4, seed=3, spacing=COHORT_SPACING, test_fraction=0.25)
    other = make_phantom_cohort(tmp_path / "other", cases=4, seed=4, spacing=COHORT_SPACING, test_fraction=0.25)
    assert tree_digest(again) == tree_digest(cohort)
    different = tree_digest(other)
    assert all(different[name] != digest for name, digest in tree_digest(cohort).items() if "_000" in name)


def test_cohort_is_a_valid_nnunet_dataset_with_a_test_split(cohort):
    assert cohort.name == "Dataset901_MSPhantom"
    verify_dataset_integrity(str(cohort), num_processes=1)
    dataset = json.loads((cohort / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert dataset["labels"] == {"background": 0, "lesion": 1}
    assert dataset["numTraining"] == 3
    test_ids = dataset["phantom"]["test_cases"]
    assert len(test_ids) == 1
    assert sorted(p.name for p in (cohort / "imagesTs").iterdir()) == [f"{test_ids[0]}_000{c}.nii.gz" for c in (0, 1)]
    assert [p.name for p in (cohort / "labelsTs").iterdir()] == [f"{test_ids[0]}.nii.gz"]
    assert len(list((cohort / "imagesTr").iterdir())) == 6
    assert not list(cohort.parent.glob(".*staging*"))


def test_written_geometry_labels_and_lesion_table_agree(cohort):
    table = pd.read_csv(cohort / LESION_TABLE)
    for label_path in sorted((cohort / "labelsTr").glob("*.nii.gz")) + sorted((cohort / "labelsTs").glob("*.nii.gz")):
        case_id = label_path.name[: -len(".nii.gz")]
        label = nib.load(label_path)
        folder = cohort / label_path.parent.name.replace("labels", "images")
        flair, t1 = (nib.load(folder / f"{case_id}_000{c}.nii.gz") for c in (0, 1))
        for image in (label, flair, t1):
            assert image.header.get_zooms() == (COHORT_SPACING,) * 3
            np.testing.assert_allclose(image.affine[:3, :3], np.eye(3) * COHORT_SPACING)
            np.testing.assert_allclose(image.affine, label.affine)
        mask = np.asanyarray(label.dataobj)
        assert set(np.unique(mask)) <= {0, 1}
        lesions = table[table.case_id == case_id]
        assert cc3d.connected_components(mask, connectivity=26, return_N=True)[1] == len(lesions)
        assert mask.sum() == lesions.voxels.sum()
        assert (np.asanyarray(flair.dataobj)[mask > 0] > 0).all()


def test_grids_have_the_requested_spacing_and_a_cpu_friendly_size():
    coarse, fine = load_template(2.0), load_template(1.0)
    assert all(70 <= n <= 100 for n in coarse.shape) and coarse.shape[0] <= 82 and coarse.shape[2] <= 82
    assert all(abs(f - 2 * c) <= 2 for f, c in zip(fine.shape, coarse.shape))
    np.testing.assert_allclose(np.diag(coarse.affine), [2, 2, 2, 1])
    np.testing.assert_allclose(np.diag(fine.affine), [1, 1, 1, 1])


def test_images_are_skull_stripped_brains_inside_the_grid(subject):
    assert subject.flair.dtype == subject.t1.dtype == np.int16
    for image in (subject.flair, subject.t1):
        assert (image[~subject.brain] == 0).all()
        assert (image[subject.brain] > 0).mean() > 0.99
    assert 1.0e6 < subject.brain.sum() * 8 < 2.0e6  # an adult brain: 1-2 litres in 2 mm voxels
    brain = subject.brain
    for touching_edge in (brain[0], brain[-1], brain[:, 0], brain[:, -1], brain[:, :, -1]):
        assert not touching_edge.any()


def test_lesions_lie_in_white_matter_and_are_separate(subject):
    lesion = subject.lesion_ids > 0
    assert len(subject.lesions) == MAX_LESIONS
    assert (subject.white_matter[lesion] > LESION_WM_PROBABILITY).all()
    _, count = cc3d.connected_components(lesion, connectivity=26, return_N=True)
    assert count == len(subject.lesions)
    voxels = np.bincount(subject.lesion_ids.ravel())[1:]
    assert voxels.tolist() == [record.voxels for record in subject.lesions]
    assert voxels.min() >= MIN_LESION_VOXELS and voxels.max() * 8 <= 1500
    assert any(record.periventricular for record in subject.lesions)
    assert any(not record.periventricular for record in subject.lesions)


def test_lesions_are_bright_on_flair_and_dark_on_t1(subject):
    lesion = subject.lesion_ids > 0
    white_matter = (subject.white_matter > 0.9) & ~lesion
    for image, brighter in ((subject.flair, True), (subject.t1, False)):
        ratio = image[lesion].mean() / image[white_matter].mean()
        assert (ratio > 1.2) if brighter else (ratio < 0.85)


def test_tissue_contrasts_look_like_flair_and_mprage(subject):
    wm = subject.white_matter > 0.9
    csf = subject.brain & (subject.white_matter < 0.05) & (subject.flair < np.percentile(subject.flair[subject.brain], 3))
    flair_wm, flair_csf = np.median(subject.flair[wm]), np.median(subject.flair[csf])
    t1_wm, t1_csf = np.median(subject.t1[wm]), np.median(subject.t1[csf])
    assert flair_csf < 0.5 * flair_wm  # CSF dark on FLAIR
    assert t1_csf < 0.5 * t1_wm  # and on T1
    cortex = subject.brain & (subject.white_matter < 0.1) & ~csf
    assert np.median(subject.flair[cortex]) > flair_wm  # GM brighter than WM on FLAIR
    assert np.median(subject.t1[cortex]) < t1_wm  # WM brightest on T1


def test_lesion_count_distribution_has_empty_subjects_and_mostly_several_lesions():
    counts = np.array([_draw_lesion_count(np.random.default_rng(seed)) for seed in range(2000)])
    assert counts.min() == 0 and counts.max() == MAX_LESIONS
    assert 0.05 < (counts == 0).mean() < 0.15
    assert (counts >= 10).mean() > 0.6


def test_lesion_blob_has_the_volume_of_its_sphere_and_holds_its_centre():
    volumes = []
    for seed in range(20):
        blob = lesion_blob((40, 40, 40), (20.3, 19.6, 20.0), 5.0, 1.0, np.random.default_rng(seed))
        assert blob[20, 20, 20]
        volumes.append(blob.sum())
        inside = np.argwhere(blob)
        assert np.linalg.norm(inside - [20.3, 19.6, 20.0], axis=1).max() < 5.0 * 2.5
    assert abs(np.mean(volumes) / (4 / 3 * np.pi * 125) - 1) < 0.15
    tiny = lesion_blob((10, 10, 10), (0, 9, 4), 0.1, 2.0, np.random.default_rng(0))
    assert tiny.sum() == 1 and tiny[0, 9, 4]
    with pytest.raises(ValueError, match="outside the volume"):
        lesion_blob((10, 10, 10), (12, 0, 0), 1.0, 1.0, np.random.default_rng(0))


def test_lesion_contrast_scales_the_interior_and_leaves_far_voxels_alone():
    image = np.full((30, 30, 30), 100.0, dtype=np.float32)
    lesion = np.zeros(image.shape, dtype=bool)
    lesion[10:20, 10:20, 10:20] = True
    apply_lesion_contrast(image, lesion, 1.5, 0.0, 1.0, np.random.default_rng(0))
    assert image[15, 15, 15] == pytest.approx(150.0, rel=1e-5)  # weight 1 deep inside, factor exactly 1.5
    assert image[0, 0, 0] == 100.0 and image[15, 15, 3] == 100.0  # beyond the 1 mm border smoothing
    assert 100.0 < image[15, 15, 9] < image[15, 15, 10] < 150.0  # the border fades


def test_smooth_random_field_is_standardized_smooth_and_seeded():
    field = smooth_random_field((40, 50, 30), 2.0, 20.0, np.random.default_rng(1))
    assert field.shape == (40, 50, 30) and field.dtype == np.float32
    assert abs(field.mean()) < 1e-5 and field.std() == pytest.approx(1.0, rel=1e-4)
    assert np.corrcoef(field[1:].ravel(), field[:-1].ravel())[0, 1] > 0.95
    np.testing.assert_array_equal(field, smooth_random_field((40, 50, 30), 2.0, 20.0, np.random.default_rng(1)))


def test_unwritable_output_gives_a_one_line_error_and_writes_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(command, [str(blocker / "raw"), "--cases", "2", "--spacing", "3"])
    assert result.exit_code != 0
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and str(blocker) in message and "cannot write" in message
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("arguments, problem", [
    (["--spacing", "0.5"], "--spacing 0.5"),
    (["--cases", "0"], "--cases 0"),
    (["--cases", "2", "--test-fraction", "0.9"], "--test-fraction 0.9"),
])
def test_bad_options_are_rejected_before_writing(tmp_path, arguments, problem):
    result = CliRunner().invoke(command, [str(tmp_path / "raw"), *arguments])
    assert result.exit_code != 0 and problem in result.output
    assert not (tmp_path / "raw").exists()


def test_library_errors_are_conversion_errors(tmp_path):
    with pytest.raises(ConversionError, match="--spacing"):
        make_phantom_cohort(tmp_path, cases=2, spacing=9.0)
