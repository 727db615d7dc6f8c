"""Per-instance saliency features: shells in mm, first-order statistics by hand, folder reading and bad input."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from nnxai.analysis.features import (FeatureError, feature_columns, first_order_statistics, instance_features,
                                     instance_regions)
from tests.fake_explain import FakeInstance, save, write_filter_output

SPACING = (0.8, 1.0, 3.0)  # mm along the array axes (nibabel order: x, y, z)
SHAPE = (7, 5, 3)
CENTRE = (3, 2, 1)


def labels_with(*voxels):
    labels = np.zeros(SHAPE, dtype=np.uint16)
    for instance_id, voxel in enumerate(voxels, start=1):
        labels[voxel] = instance_id
    return labels


def test_shell_is_in_millimetres_and_leaves_other_instances_out():
    inside, shell = instance_regions(labels_with(CENTRE), 1, SPACING, 2)
    assert inside.sum() == 1 and inside[CENTRE]
    # Within 2 mm of the centre voxel: x offsets 1, 2 (0.8, 1.6 mm), y offsets 1, 2 (1, 2 mm), the four
    # (x 1, y 1) diagonals (1.28 mm) and the four (x 2, y 1) ones (1.89 mm); (x 1, y 2) is 2.15 mm away and
    # any z step 3 mm.
    offsets = {tuple(int(v) for v in np.subtract(index, CENTRE)) for index in np.argwhere(shell)}
    expected = {(dx, 0, 0) for dx in (-2, -1, 1, 2)} | {(0, dy, 0) for dy in (-2, -1, 1, 2)} | {
        (dx, dy, 0) for dy in (-1, 1) for dx in (-2, -1, 1, 2)}
    assert offsets == expected
    _, shell = instance_regions(labels_with(CENTRE, (4, 2, 1)), 1, SPACING, 2)
    assert shell.sum() == 15 and not shell[4, 2, 1]  # the neighbouring instance's voxel is not tissue around it


def test_first_order_statistics_by_hand():
    # four -1 and twelve 0: a Bernoulli(1/4) variable, negated
    result = first_order_statistics(np.array([-1.0] * 4 + [0.0] * 12))
    assert result == pytest.approx({"mean": -0.25, "std": math.sqrt(0.1875), "median": 0.0, "p10": -1.0,
                                    "p90": 0.0, "skewness": -2 / math.sqrt(3), "kurtosis": -2 / 3,
                                    "peak_pos": 0.0, "peak_neg": -1.0})
    constant = first_order_statistics(np.array([2.0]))
    assert constant["skewness"] == constant["kurtosis"] == constant["std"] == 0.0
    with pytest.raises(ValueError):
        first_order_statistics(np.array([]))


def hand_built_output(out, gradcampp=False):
    """Case 'c1': instance 1 one voxel (TP), instance 2 two voxels (FP), instance 3 an FN lesion."""
    labels = labels_with(CENTRE)
    labels[0:2, 0, 0] = 2
    labels[6, 4, 2] = 3
    flair = np.zeros(SHAPE)
    flair[CENTRE] = 5.0
    flair[[1, 2, 4, 5], 2, 1] = -1.0  # the four x neighbours in instance 1's shell
    flair[6, 2, 1] = 100.0  # 2.4 mm away: outside the shell
    flair[3, 2, 0] = 100.0  # 3 mm away along z: outside too
    flair[1, 2, 0] = -3.0  # outside instance 1's shell; exactly 2 mm from instance 2's voxel (1, 0, 0)
    t1 = np.full(SHAPE, 0.5)
    instances = [FakeInstance(1, "TP", labels == 1, {"FLAIR": flair, "T1": t1}),
                 FakeInstance(2, "FP", labels == 2, {"FLAIR": -flair, "T1": t1}),
                 FakeInstance(3, "FN", labels == 3, {"FLAIR": t1, "T1": t1})]
    cam = {("c1", 1): flair.clip(min=0), ("c1", 2): np.ones(SHAPE)} if gradcampp else None
    return write_filter_output(out, {"c1": instances}, SPACING, {("c1", 1): 0.8, ("c1", 2): 0.6}, cam)


def test_features_of_a_hand_built_case(tmp_path):
    hand_built_output(tmp_path)
    table = instance_features(tmp_path)
    assert list(table.columns) == ["case", "instance_id", "group", *feature_columns(["FLAIR", "T1"])]
    assert table[["case", "instance_id", "group"]].values.tolist() == [["c1", 1, "TP"], ["c1", 2, "FP"]]
    first = table.iloc[0]
    assert first["smoothgrad_FLAIR_inside_mean"] == first["smoothgrad_FLAIR_inside_peak_pos"] == 5.0
    # shell: the four -1 and twelve 0 of the statistics test; the 100s lie beyond 2 mm
    assert first["smoothgrad_FLAIR_shell_mean"] == pytest.approx(-0.25)
    assert first["smoothgrad_FLAIR_shell_peak_pos"] == 0.0 and first["smoothgrad_FLAIR_shell_peak_neg"] == -1.0
    assert first["smoothgrad_FLAIR_shell_skewness"] == pytest.approx(-2 / math.sqrt(3))
    assert first["smoothgrad_T1_shell_std"] == 0.0 and first["smoothgrad_T1_inside_mean"] == 0.5
    assert first["log_volume_mm3"] == pytest.approx(math.log(0.8 * 1.0 * 3.0))
    assert first["mean_probability"] == 0.8
    second = table.iloc[1]
    assert second["log_volume_mm3"] == pytest.approx(math.log(2 * 2.4))
    # instance 2 has -flair as its map: its shell holds the 3 at (1, 2, 0), exactly 2 mm away, but not the
    # -100 at (3, 2, 0), 2.56 mm away
    assert second["smoothgrad_FLAIR_shell_peak_pos"] == 3.0 and second["smoothgrad_FLAIR_shell_peak_neg"] == 0.0
    assert second["smoothgrad_FLAIR_inside_mean"] == 0.0 and second["mean_probability"] == 0.6
    assert not table.isna().any().any()


def test_uncertainty_columns_of_the_explain_table_become_features(tmp_path):
    hand_built_output(tmp_path)
    for path in (tmp_path / "instances.csv", tmp_path / "c1" / "instances.csv"):  # a single-fold run: no fold std
        pd.read_csv(path).assign(fold_std_probability=np.nan, mean_entropy=[0.25, 0.75, 0.5]).to_csv(path, index=False)
    table = instance_features(tmp_path)
    assert list(table.columns)[3:] == feature_columns(["FLAIR", "T1"], uncertainty=("mean_entropy",))
    assert table["mean_entropy"].tolist() == [0.25, 0.75]
    for path in (tmp_path / "instances.csv", tmp_path / "c1" / "instances.csv"):  # a fold ensemble
        pd.read_csv(path).assign(fold_std_probability=[0.1, 0.3, np.nan]).to_csv(path, index=False)
    table = instance_features(tmp_path)
    assert table.columns[-2:].tolist() == ["fold_std_probability", "mean_entropy"]
    assert table["fold_std_probability"].tolist() == [0.1, 0.3]


def test_gradcampp_features_when_maps_present(tmp_path):
    hand_built_output(tmp_path, gradcampp=True)
    table = instance_features(tmp_path)
    assert list(table.columns)[3:] == feature_columns(["FLAIR", "T1"], ("smoothgrad", "gradcampp"))
    assert table["gradcampp_inside_mean"].tolist() == [5.0, 1.0]
    assert table.loc[0, "gradcampp_shell_peak_neg"] == 0.0


def test_missing_gradcampp_map_is_named(tmp_path):
    hand_built_output(tmp_path, gradcampp=True)
    (tmp_path / "c1" / "gradcampp" / "002.nii.gz").unlink()
    with pytest.raises(FeatureError, match=r"c1/gradcampp/002.nii.gz: missing"):
        instance_features(tmp_path)


def test_bad_folders(tmp_path):
    with pytest.raises(FeatureError, match="not an nnxai explain output folder"):
        instance_features(tmp_path)
    hand_built_output(tmp_path)
    save(np.zeros((7, 5, 2), np.float32), tmp_path / "c1" / "smoothgrad" / "001_T1.nii.gz", SPACING)
    with pytest.raises(FeatureError, match=r"c1/smoothgrad/001_T1.nii.gz: grid \(7, 5, 2\)"):
        instance_features(tmp_path)
    (tmp_path / "c1" / "smoothgrad" / "001_FLAIR.nii.gz").write_bytes(b"not an image")
    with pytest.raises(FeatureError, match="001_FLAIR.nii.gz: not a readable NIfTI image"):
        instance_features(tmp_path)
    record = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**record, "channels": "FLAIR"}))
    with pytest.raises(FeatureError, match="run.json: no list of channels"):
        instance_features(tmp_path)
