"""`nnxai explain` end to end on a tiny trained model: faithful to nnU-Net, right geometry, resumable, safe."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from scipy import ndimage

from nnxai.attribution.engine import GradientEngine
from nnxai.attribution.smoothgrad import Sampling, smoothgrad_maps
from nnxai.cli import main
from nnxai.explain.cases import CaseError, find_cases, read_ground_truth, shard
from nnxai.explain.cohort import check_settings, explain_cohort, instance_maps, run_record
from nnxai.explain.settings import ExplainSettings
from nnxai.nnunet.geometry import preprocess, to_network_space, to_original_space, world_coordinates
from nnxai.nnunet.model import ModelError, load_model
from tests.fake_model import write_case, write_model_folder

SETTINGS = ExplainSettings(samples=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    model_dir = write_model_folder(root / "model")
    for i in range(2):
        write_case(root / "images", f"case_{i}", seed=i, labels_dir=root / "labels")
    model = load_model(model_dir)
    result = explain_cohort(model, root / "images", root / "out", SETTINGS, root / "labels", progress=False)
    return root, model, result


def read(path):
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_outputs_have_the_input_geometry(cohort):
    root, model, result = cohort
    assert result.done == ["case_0", "case_1"] and not result.failed
    source, _ = read(root / "images" / "case_0_0000.nii.gz")
    for name in ["prediction.nii.gz", "instances.nii.gz", "smoothgrad/001_FLAIR.nii.gz", "smoothgrad/002_T1.nii.gz"]:
        image, _ = read(root / "out" / "case_0" / name)
        assert image.GetSize() == source.GetSize()
        assert np.allclose(image.GetSpacing(), source.GetSpacing())
        assert np.allclose(image.GetOrigin(), source.GetOrigin())
        assert np.allclose(image.GetDirection(), source.GetDirection())


def test_segmentation_equals_nnunet_predict(cohort, tmp_path):
    root, _, _ = cohort
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(root / "model"), (0,))
    predictor.predict_from_files(str(root / "images"), str(tmp_path), save_probabilities=False,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    for case in ["case_0", "case_1"]:
        _, theirs = read(tmp_path / f"{case}.nii.gz")
        _, ours = read(root / "out" / case / "prediction.nii.gz")
        assert theirs.sum() > 50 and np.array_equal(theirs > 0, ours > 0)


def test_logits_are_nnunet_predictors_own_for_a_fold_ensemble(tmp_path):
    folder = write_model_folder(tmp_path / "model", folds=(0, 1))
    model = load_model(folder)
    weights = [{k: v.clone() for k, v in network.state_dict().items()} for network in model.networks]
    data = torch.randn(2, 20, 26, 14, generator=torch.Generator().manual_seed(3))
    ours = model.nnunet_logits(data)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0, 1))
    theirs = predictor.predict_logits_from_preprocessed_data(data)
    assert ours.dtype == torch.float16 and torch.equal(ours, theirs)  # bit for bit, float16 accumulation included
    for network, fold_weights in zip(model.networks, weights):  # our fold networks keep their own weights
        assert all(torch.equal(value, network.state_dict()[key]) for key, value in fold_weights.items())
    assert not torch.equal(*(next(iter(fold_weights.values())) for fold_weights in weights))  # two different folds



def test_noise_sigma_comes_from_the_channel_named_flair(cohort):
    root, model, _ = cohort
    flair_second = replace(model, dataset_json={**model.dataset_json, "channel_names": {"0": "T1", "1": "FLAIR"}})
    settings = check_settings(flair_second, ExplainSettings(samples=1, noise=0.1))
    assert settings.noise_channel == 1
    data = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    data[1] = 0.5  # a constant FLAIR: noise 0.1 x its range 0, so the map is the noise-free gradient
    mask = np.zeros((16, 16, 16), bool)
    mask[6:9, 6:9, 6:9] = True
    window = flair_second.sliding_window(use_mirroring=False)
    (_, _, noisy, _), = instance_maps(window, data, {1: mask}, flair_second.channel_names, settings, "c", GradientEngine())
    noise_free = dict(smoothgrad_maps(window, data, {1: mask}, Sampling(1), noise=0.0))[1].map
    np.testing.assert_array_equal(noisy, noise_free)
    assert run_record(flair_second, settings, root / "images", None)["noise_channel_note"] is None
    unnamed = replace(model, dataset_json={**model.dataset_json, "channel_names": {"0": "T2", "1": "PD"}})
    assert check_settings(unnamed, ExplainSettings()).noise_channel == 0
    assert run_record(unnamed, settings, root / "images", None)["noise_channel_note"] == (
        "no input channel is named FLAIR in dataset.json (T2, PD): the SmoothGrad noise sigma is taken from the "
        "range of channel 0 (T2)")

def test_groups_and_tables_match_instance_map(cohort):
    root, _, _ = cohort
    table = pd.read_csv(root / "out" / "case_0" / "instances.csv")
    _, instances = read(root / "out" / "case_0" / "instances.nii.gz")
    _, gt = read(root / "labels" / "case_0.nii.gz")
    assert sorted(table.group) == ["TP", "TP"]  # the two blobs are found, nothing else
    for row in table.itertuples():
        mask = instances == row.instance_id
        assert mask.sum() == row.voxels
        assert gt[mask].any()
        assert row.volume_mm3 == pytest.approx(row.voxels * 1.2 * 1.0 * 2.0)
        assert row.smoothgrad_FLAIR_mean > 0 > row.smoothgrad_T1_mean  # bright FLAIR and dark T1 drive lesions
    cohort_table = pd.read_csv(root / "out" / "instances.csv")
    assert len(cohort_table) == 4 and set(cohort_table.case) == {"case_0", "case_1"}


def test_map_peaks_at_its_instance_on_oblique_anisotropic_input(cohort):
    root, _, _ = cohort
    _, instances = read(root / "out" / "case_1" / "instances.nii.gz")
    for instance_id in (1, 2):
        _, saliency = read(root / "out" / "case_1" / "smoothgrad" / f"{instance_id:03d}_FLAIR.nii.gz")
        peak = np.unravel_index(np.argmax(saliency), saliency.shape)
        near = ndimage.binary_dilation(instances == instance_id, iterations=1)
        assert near[peak]


def test_centroid_world_coordinates_agree_with_itk(cohort):
    root, model, _ = cohort
    image, _ = read(root / "images" / "case_0_0000.nii.gz")
    _, properties = preprocess(model, [root / "images" / "case_0_0000.nii.gz", root / "images" / "case_0_0001.nii.gz"])
    index_zyx = np.array([3.0, 7.5, 11.0])
    lps = image.TransformContinuousIndexToPhysicalPoint(index_zyx[::-1].tolist())
    assert np.allclose(world_coordinates(properties, index_zyx), [-lps[0], -lps[1], lps[2]])


def test_geometry_round_trip(cohort):
    root, model, _ = cohort
    files = [root / "images" / f"case_0_000{c}.nii.gz" for c in range(2)]
    data, properties = preprocess(model, files)
    _, gt = read(root / "labels" / "case_0.nii.gz")
    network = to_network_space(model, gt.astype(np.int32), properties)
    assert network.shape == data.shape[1:]  # transposed and resampled to the network grid
    back = to_original_space(model, network[None].astype(np.float32), properties)[0] > 0.5
    # resampling twice blurs the small blobs' borders, but nothing moves: same place, no voxel outside
    assert back.sum() > 0.5 * gt.sum() and not (back & (gt == 0)).any()
    for blob in (1, 2):
        original = ndimage.label(gt)[0] == blob
        assert np.allclose(ndimage.center_of_mass(back & original), ndimage.center_of_mass(original), atol=0.5)


def test_run_record_and_resume(cohort):
    root, model, _ = cohort
    record = json.loads((root / "out" / "run.json").read_text())
    assert record["settings"]["samples"] == 2 and record["channels"] == ["FLAIR", "T1"]
    assert len(record["model"]["checkpoint_sha256"]["0"]) == 64
    again = explain_cohort(model, root / "images", root / "out", SETTINGS, root / "labels", progress=False)
    assert again.skipped == ["case_0", "case_1"] and not again.done


def test_other_settings_in_same_folder_are_refused(cohort):
    root, model, _ = cohort
    with pytest.raises(Exception, match="other settings"):
        explain_cohort(model, root / "images", root / "out", ExplainSettings(samples=3), root / "labels",
                       progress=False)


def test_bad_cases_fail_alone_with_one_line_each(cohort, tmp_path):
    root, model, _ = cohort
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(root / "images", images)
    shutil.copytree(root / "labels", labels)
    write_case(images, "no_t1", seed=3, labels_dir=labels)
    (images / "no_t1_0001.nii.gz").unlink()
    write_case(images, "nan", seed=4, labels_dir=labels)
    flair = sitk.ReadImage(str(images / "nan_0000.nii.gz"))
    array = sitk.GetArrayFromImage(flair)
    array[2, 2, 2] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(flair)
    sitk.WriteImage(nan_image, str(images / "nan_0000.nii.gz"))
    write_case(images, "shifted_t1", seed=5, spacing=(1.2, 1.0, 2.0), labels_dir=labels)
    write_case(tmp_path / "other", "shifted_t1", seed=5, spacing=(1.0, 1.0, 2.0))
    shutil.copy(tmp_path / "other" / "shifted_t1_0001.nii.gz", images / "shifted_t1_0001.nii.gz")
    write_case(images, "small_gt", seed=6)
    write_case(tmp_path / "other", "small_gt", seed=6, size=(10, 10, 10), labels_dir=labels)
    write_case(images, "moved_gt", seed=7, labels_dir=labels)
    move_image(labels / "moved_gt.nii.gz", lambda image: image.SetOrigin((-10.0, 20.0, 7.0)))
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["explain", "-i", str(images), "-o", str(out), "-m", str(root / "model"),
                                  "--gt", str(labels), "--samples", "1", "-device", "cpu"])
    assert result.exit_code == 1
    assert "no_t1_0001.nii.gz: missing channel file" in result.output
    assert "nan_0000.nii.gz: contains NaN or Inf voxels" in result.output
    assert "shifted_t1_0001.nii.gz: spacing" in result.output
    assert "small_gt.nii.gz: size (10, 10, 10) differs from (20, 26, 14) in small_gt_0000.nii.gz" in result.output
    assert "moved_gt.nii.gz: origin (-10.0, 20.0, 7.0) differs from (-10.0, 20.0, 5.0) in moved_gt_0000.nii.gz" \
        in result.output
    finished = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert finished == ["case_0", "case_1"]  # the good cases, and no half-written folder of a failed one


def move_image(path, change):
    """Rewrite an image with its header changed by `change(image)`, its voxels kept."""
    image = sitk.ReadImage(str(path))
    change(image)
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("change, message", [
    (lambda image: image.SetOrigin((-10.0, 20.0, 7.0)),
     r"origin \(-10.0, 20.0, 7.0\) differs from \(-10.0, 20.0, 5.0\)"),
    (lambda image: image.SetDirection(np.eye(3).ravel().tolist()),
     r"direction \(1.0, -?0.0, .*\) differs from \(0.9659.*\)"),
], ids=["origin", "direction"])
def test_ground_truth_on_another_grid_is_refused(tmp_path, change, message):
    model = load_model(write_model_folder(tmp_path / "model"))
    expected = write_case(tmp_path / "images", "case", seed=0, labels_dir=tmp_path / "labels")
    image_file, gt_file = tmp_path / "images" / "case_0000.nii.gz", tmp_path / "labels" / "case.nii.gz"
    assert np.array_equal(read_ground_truth(model, gt_file, image_file, 1), expected == 1)
    move_image(gt_file, change)  # same shape and spacing, another place in the scanner
    with pytest.raises(CaseError, match=f"^{gt_file}: {message} in case_0000.nii.gz$"):
        read_ground_truth(model, gt_file, image_file, 1)


def test_unknown_fold_and_missing_model_are_clear(cohort, tmp_path):
    root, _, _ = cohort
    with pytest.raises(ModelError, match="fold 3 has no checkpoint_final.pth"):
        load_model(root / "model", ["3"])
    with pytest.raises(ModelError, match="no such model folder"):
        load_model(tmp_path / "nowhere")


def test_sharding_matches_nnunet():
    cases = [f"c{i}" for i in range(7)]
    parts = [shard(cases, 3, p) for p in range(3)]
    assert parts[0] == ["c0", "c3", "c6"] and sorted(sum(parts, [])) == cases


def test_case_without_lesions_gives_empty_table(cohort, tmp_path):
    root, model, _ = cohort
    images = tmp_path / "images"
    write_case(images, "clean", seed=7)
    for channel in range(2):  # a flat FLAIR and a ramp on T1: nothing lesion-like (bright FLAIR) anywhere
        image = sitk.ReadImage(str(images / f"clean_000{channel}.nii.gz"))
        shape = sitk.GetArrayFromImage(image).shape
        ramp = np.broadcast_to(np.linspace(1, 2 if channel else 1, shape[-1], dtype=np.float32), shape).copy()
        flat = sitk.GetImageFromArray(ramp)
        flat.CopyInformation(image)
        sitk.WriteImage(flat, str(images / f"clean_000{channel}.nii.gz"))
    result = explain_cohort(model, images, tmp_path / "out", SETTINGS, progress=False)
    assert result.done == ["clean"]
    assert pd.read_csv(tmp_path / "out" / "clean" / "instances.csv").empty
    assert find_cases(images, ".nii.gz", 2) == {"clean": [images / "clean_0000.nii.gz", images / "clean_0001.nii.gz"]}
