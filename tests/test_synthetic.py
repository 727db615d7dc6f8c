"""Synthetic lesions: white matter, placement, the inserted contrast, and the experiment on the tiny trained model."""
import hashlib
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from scipy import ndimage

from nnxai.cli import main
from nnxai.experiments.common import ExperimentError
from nnxai.experiments.synthetic import (PlacedLesion, PlannedLesion, SyntheticDesign, insert_lesions, normal_appearing,
                                         place_lesions, saliency_statistics, synthetic_channels, table_columns,
                                         white_matter_from_t1)
from nnxai.explain.cohort import nnunet_prediction
from nnxai.nnunet.geometry import preprocess_array, read_images
from nnxai.nnunet.model import load_model
from tests.experiment_data import SETTINGS, explained_cohort, write_like
from tests.fake_model import write_model_folder


def test_white_matter_is_the_brightest_t1_class_inside_the_brain():
    rng = np.random.default_rng(0)
    t1 = np.zeros((20, 20, 36), np.float32)  # background 0 around a brain of three 10-voxel tissue slabs
    tissue = np.zeros(t1.shape, int)
    tissue[2:18, 2:18, 3:13], tissue[2:18, 2:18, 13:23], tissue[2:18, 2:18, 23:33] = 1, 2, 3
    t1[tissue > 0] = np.array([0, 300, 600, 900])[tissue[tissue > 0]] + rng.normal(0, 40, (tissue > 0).sum())
    white_matter = white_matter_from_t1(t1, t1 != 0)
    truth = tissue == 3
    dice = 2 * (white_matter & truth).sum() / (white_matter.sum() + truth.sum())
    assert dice > 0.95 and not white_matter[tissue < 3].any()


def test_normal_appearing_white_matter_keeps_clear_of_lesions_in_mm():
    white_matter = np.ones((1, 1, 12), bool)
    lesion = np.zeros_like(white_matter)
    lesion[0, 0, 0] = True
    nawm = normal_appearing(white_matter, lesion, spacing=(1.0, 1.0, 2.0), clearance_mm=5.0)
    assert np.flatnonzero(nawm[0, 0]).tolist() == list(range(3, 12))  # 6 mm and farther; 4 mm is too close


def test_placement_respects_white_matter_distance_and_room():
    nawm = np.zeros((20, 20, 60), bool)
    nawm[3:17, 3:17, 3:57] = True
    design = SyntheticDesign(sizes_mm3=(100.0,), flair_factors=(1.3,), t1_factors=(0.8, 0.9), per_case=2,
                             per_volume=2, min_distance_mm=30.0, margin_mm=2.0)
    assert [[lesion.lesion_id for lesion in volume] for volume in design.volumes()] == [[1, 2], [3, 4]]
    placement = place_lesions(nawm, design, (1.0, 1.0, 1.0), np.random.default_rng(0))
    assert len(placement.placed) == 4 and not placement.unplaced
    for volume in (1, 2):
        first, second = [lesion.mask for lesion in placement.placed if lesion.volume_id == volume]
        assert not (first & ~nawm).any() and not (second & ~nawm).any()
        distance = np.linalg.norm(np.argwhere(first).mean(0) - np.argwhere(second).mean(0))
        assert distance > 20  # centres >= 30 mm apart; blobs of ~100 voxels stay near their centres
        assert 40 < first.sum() < 200
    no_room = place_lesions(nawm[:, :, :8], design, (1.0, 1.0, 1.0), np.random.default_rng(0))
    assert len(no_room.unplaced) == 2  # the second lesion of each volume cannot be 30 mm from the first


def test_contrast_multiplies_the_lesion_and_nothing_far_from_it():
    images = np.full((2, 25, 25, 25), 100.0, np.float32)
    mask = np.zeros((25, 25, 25), bool)
    mask[8:17, 8:17, 8:17] = True
    lesion = PlacedLesion(PlannedLesion(1, 729.0, 1.5, 0.5), mask, 1)
    design = SyntheticDesign(flair_sd=0.0, t1_sd=0.0)
    modified = insert_lesions(images, [lesion], 0, 1, design, (1.0, 1.0, 1.0), np.random.default_rng(0))
    assert modified[0, 12, 12, 12] == pytest.approx(150, abs=1) and modified[1, 12, 12, 12] == pytest.approx(50, abs=1)
    assert modified[:, 0, 0, 0].tolist() == [100, 100] and images[0, 12, 12, 12] == 100  # input untouched
    assert 100 < modified[0, 7, 12, 12] < modified[0, 8, 12, 12] < 150  # the border is blended over about a millimetre


def test_design_and_channels_refuse_what_cannot_work():
    with pytest.raises(ExperimentError, match="sizes_mm3"):
        SyntheticDesign(sizes_mm3=())
    assert synthetic_channels(["FLAIR", "MPRAGE"], False) == (0, 1)
    assert synthetic_channels(["T2", "FLAIR"], True) == (1, None)
    with pytest.raises(ExperimentError, match="no T1 to find white matter in"):
        synthetic_channels(["T2", "FLAIR"], False)
    with pytest.raises(ExperimentError, match="none is FLAIR"):
        synthetic_channels(["T1", "T2"], True)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_bright_lesions_are_detected_faint_ones_not(tmp_path):
    model, out = explained_cohort(tmp_path)
    images = tmp_path / "images"
    reference = images / "case_0_0000.nii.gz"
    shape = sitk.GetArrayFromImage(sitk.ReadImage(str(reference))).shape
    write_like(reference, np.ones(shape, np.uint8), tmp_path / "wm" / "case_0.nii.gz")
    before = digest(images)
    runner = CliRunner()
    args = ["experiment", "synthetic", str(out), "--sizes", "60", "--flair-factors", "1.02,1.6", "--t1-factors",
            "1.0", "--per-case", "2", "--per-volume", "2", "--min-distance-mm", "15", "--wm-mask",
            str(tmp_path / "wm"), "--save-volumes", "-device", "cpu"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "experiments" / "synthetic.csv")
    assert list(table.columns) == table_columns(["FLAIR", "T1"], ["smoothgrad"])
    assert (table.smoothgrad_samples == 1).all()  # the explain run's settings
    assert len(table) == 4 and set(table.group) == {"synthetic"}
    bright, faint = table[table.flair_factor == 1.6], table[table.flair_factor == 1.02]
    assert bright.detected.all() and not faint.detected.any()
    assert bright.mean_probability.min() > 0.5 > faint.mean_probability.max()
    assert (table.baseline_probability < 0.2).all()  # placed in tissue the model saw as normal
    assert (bright.explained_region == "prediction").all() and (faint.explained_region == "inserted").all()
    assert (bright.smoothgrad_FLAIR_peak_pos > 0).all() and table.filter(regex="smoothgrad_(FLAIR|T1)_").notna().all().all()
    assert (table.volume_mm3 > 20).all() and table.centroid_x.notna().all()

    assert digest(images) == before  # inputs never change on disk
    saved = out / "experiments" / "synthetic_volumes" / "case_0"
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        f"case_0_syn{v:03d}_{kind}.nii.gz" for v in (1, 2) for kind in ("0000", "0001", "lesions"))
    ids = sitk.GetArrayFromImage(sitk.ReadImage(str(saved / "case_0_syn001_lesions.nii.gz")))
    assert sorted(np.unique(ids)) == [0, 1, 2]
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(saved / "case_0_syn001_0000.nii.gz")))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
    bright_id = int(table[(table.volume_id == 1) & (table.flair_factor == 1.6)].lesion_id.iloc[0])
    ratio = flair / original
    assert 1.45 < ratio[ids == bright_id].max() < 1.8  # the factor inside, blended down towards the border
    assert np.allclose(ratio[~ndimage.binary_dilation(ids > 0, np.ones((3, 3, 3)), iterations=5)], 1)  # the rest: input
    # a saved volume explained again: nnU-Net's own prediction, the probabilities of the table to the last bit
    volume, properties = read_images(model, [saved / f"case_0_syn001_000{c}.nii.gz" for c in range(2)])
    probability, _ = nnunet_prediction(model, torch.from_numpy(preprocess_array(model, volume, properties)),
                                       properties, SETTINGS)
    for row in table[table.volume_id == 1].itertuples():
        assert row.mean_probability == float(probability[ids == row.lesion_id].mean())

    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "1 finished earlier" in again.output

    write_like(reference, np.ones(shape, np.uint8)[:, :, :-1], tmp_path / "bad_wm" / "case_0.nii.gz")
    other = tmp_path / "other_out"  # the same explain run, another experiment folder
    other.mkdir()
    for name in ("run.json", "instances.csv"):
        (other / name).write_text((out / name).read_text())
    bad = runner.invoke(main, ["experiment", "synthetic", str(other), "--sizes", "60", "--wm-mask",
                               str(tmp_path / "bad_wm"), "-device", "cpu"])
    assert bad.exit_code == 1 and "bad_wm/case_0.nii.gz: shape" in bad.output and "Traceback" not in bad.output
    assert not list((other / "experiments" / "synthetic").glob("*.csv"))  # no table for the failed case


def test_saliency_follows_the_runs_methods(tmp_path):
    model = load_model(write_model_folder(tmp_path / "model"))
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 20, 20, 20)).astype(np.float32))
    data[0, 8:12, 8:12, 8:12] += 3  # a bright FLAIR blob: a lesion to the tiny model
    mask = np.zeros((20, 20, 20), bool)
    mask[8:12, 8:12, 8:12] = True
    settings = replace(SETTINGS, methods=("smoothgrad", "gradcampp"), samples=2)
    statistics = saliency_statistics(model.sliding_window(use_mirroring=False), data, {5: mask}, ["FLAIR", "T1"],
                                     settings, "case")[5]
    assert list(statistics) == table_columns(["FLAIR", "T1"], settings.methods)[18:]
    assert statistics["smoothgrad_samples"] == 2 and statistics["smoothgrad_FLAIR_peak_pos"] > 0
    assert statistics["gradcampp_peak"] >= statistics["gradcampp_mean"] >= 0  # ReLU'd map


def test_without_saliency_the_columns_are_empty():
    masks = {3: np.ones((4, 4, 4), bool)}
    settings = replace(SETTINGS, samples=0, methods=("smoothgrad", "gradcampp"))
    statistics = saliency_statistics(None, torch.zeros((2, 4, 4, 4)), masks, ["FLAIR", "T1"], settings, "case")
    assert list(statistics[3]) == table_columns(["FLAIR", "T1"], settings.methods)[18:]
    assert list(statistics[3])[-2:] == ["gradcampp_peak", "gradcampp_mean"]
    assert all(np.isnan(value) for value in statistics[3].values())
