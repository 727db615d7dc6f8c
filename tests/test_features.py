"""Per-instance saliency features: shells in mm, first-order statistics by hand, folder reading and bad input."""
import math

import numpy as np
import pytest

from nnxai.features import (FeatureError, feature_columns, first_order_statistics, instance_features,
                            shell_mask)
from tests.fake_explain import write_case_output, write_run

SPACING = (3.0, 1.0, 0.8)  # mm along the array axes (z, y, x)
CENTRE = (1, 2, 3)


def single_voxel(shape=(3, 5, 7)):
    mask = np.zeros(shape, dtype=bool)
    mask[CENTRE] = True
    return mask


def test_shell_is_in_millimetres():
    shell = shell_mask(single_voxel(), SPACING, 2.0)
    # Within 2 mm of the centre voxel: x offsets 1, 2 (0.8, 1.6 mm), y offsets 1, 2 (1, 2 mm), the four
    # (y 1, x 1) diagonals (1.28 mm) and the four (y 1, x 2) ones (1.89 mm); (y 2, x 1) is 2.15 mm and any
    # z step is 3 mm.
    offsets = {tuple(int(v) for v in np.subtract(index, CENTRE)) for index in np.argwhere(shell)}
    expected = {(0, 0, dx) for dx in (-2, -1, 1, 2)} | {(0, dy, 0) for dy in (-2, -1, 1, 2)} | {
        (0, dy, dx) for dy in (-1, 1) for dx in (-2, -1, 1, 2)}
    assert offsets == expected


def test_first_order_statistics_by_hand():
    # four -1 and twelve 0: a Bernoulli(1/4) variable, negated
    values = np.array([-1.0] * 4 + [0.0] * 12)
    result = first_order_statistics(values)
    assert result == pytest.approx({"mean": -0.25, "std": math.sqrt(0.1875), "median": 0.0, "p10": -1.0,
                                    "p90": 0.0, "skewness": -2 / math.sqrt(3), "kurtosis": -2 / 3,
                                    "peak_pos": 0.0, "peak_neg": -1.0})
    constant = first_order_statistics(np.array([2.0]))
    assert constant["skewness"] == constant["kurtosis"] == constant["std"] == 0.0
    with pytest.raises(ValueError):
        first_order_statistics(np.array([]))


def hand_built_case(out_dir, gradcampp=False):
    """Case 'c1': instance 1 one voxel (TP), instance 2 a 2-voxel FP, instance 3 an FN lesion."""
    instances = single_voxel().astype(np.uint16)
    instances[0, 0, 0:2] = 2
    instances[2, 4, 6] = 3
    shell = shell_mask(instances == 1, SPACING, 2.0)
    flair = np.zeros(instances.shape)
    flair[instances == 1] = 5.0
    flair[1, 2, [1, 2, 4, 5]] = -1.0  # the four x neighbours in the shell
    flair[1, 2, 6] = 100.0  # 2.4 mm away: outside the shell
    flair[0, 2, 3] = 100.0  # 3 mm away along z: outside too
    flair[0, 2, 1] = -3.0  # outside instance 1's shell; exactly 2 mm from instance 2's voxel (0, 0, 1)
    assert shell.sum() == 16
    t1 = np.full(instances.shape, 0.5)
    maps = {1: {"FLAIR": flair, "T1": t1}, 2: {"FLAIR": -flair, "T1": t1}}
    write_run(out_dir)
    cam = {1: flair.clip(min=0), 2: np.ones(instances.shape)} if gradcampp else None
    return write_case_output(out_dir, "c1", instances, {1: "TP", 2: "FP", 3: "FN"}, maps, SPACING,
                             probabilities={1: 0.8, 2: 0.6}, gradcampp=cam)


def test_features_of_a_hand_built_case(tmp_path):
    hand_built_case(tmp_path)
    table = instance_features(tmp_path)
    assert list(table.columns) == ["case", "instance_id", "group", *feature_columns(["FLAIR", "T1"])]
    assert table[["case", "instance_id", "group"]].values.tolist() == [["c1", 1, "TP"], ["c1", 2, "FP"]]
    first = table.iloc[0]
    assert first["smoothgrad_FLAIR_inside_mean"] == first["smoothgrad_FLAIR_inside_peak_pos"] == 5.0
    assert first["smoothgrad_FLAIR_shell_mean"] == pytest.approx(-0.25)
    assert first["smoothgrad_FLAIR_shell_peak_pos"] == 0.0  # the 100s lie beyond 2 mm
    assert first["smoothgrad_FLAIR_shell_peak_neg"] == -1.0
    assert first["smoothgrad_FLAIR_shell_skewness"] == pytest.approx(-2 / math.sqrt(3))
    assert first["smoothgrad_T1_shell_std"] == 0.0 and first["smoothgrad_T1_inside_mean"] == 0.5
    assert first["log_volume_mm3"] == pytest.approx(math.log(3.0 * 1.0 * 0.8))
    assert first["mean_probability"] == 0.8
    second = table.iloc[1]
    assert second["log_volume_mm3"] == pytest.approx(math.log(2 * 2.4))
    # instance 2 (x = 0, 1 of row (0, 0)) has -flair as its map: its shell holds the 3 at (0, 2, 1), exactly
    # 2 mm away, but not the -100 at (0, 2, 3), 2.56 mm away.
    assert second["smoothgrad_FLAIR_shell_peak_pos"] == 3.0 and second["smoothgrad_FLAIR_shell_peak_neg"] == 0.0
    assert second["smoothgrad_FLAIR_inside_mean"] == 0.0
    assert not table.isna().any().any()


def test_gradcampp_features_when_maps_present(tmp_path):
    hand_built_case(tmp_path, gradcampp=True)
    table = instance_features(tmp_path)
    assert list(table.columns)[3:] == feature_columns(["FLAIR", "T1"], gradcampp=True)
    assert table["gradcampp_inside_mean"].tolist() == [5.0, 1.0]
    assert table.loc[0, "gradcampp_shell_peak_neg"] == 0.0


def test_missing_gradcampp_map_is_named(tmp_path):
    case_dir = hand_built_case(tmp_path, gradcampp=True)
    (case_dir / "gradcampp" / "002.nii.gz").unlink()
    with pytest.raises(FeatureError, match=r"c1/gradcampp/002.nii.gz: missing"):
        instance_features(tmp_path)


def test_bad_folders(tmp_path):
    with pytest.raises(FeatureError, match="not an nnxai explain output folder"):
        instance_features(tmp_path)
    case_dir = hand_built_case(tmp_path)
    write_case_output(tmp_path, "c2", single_voxel()[:2].astype(np.uint16), {1: "TP"},
                      {1: {"FLAIR": np.zeros((2, 5, 7)), "T1": np.zeros((3, 5, 7))}})
    with pytest.raises(FeatureError, match=r"c2/smoothgrad/001_T1.nii.gz: shape \(3, 5, 7\) differs"):
        instance_features(tmp_path)
    (case_dir / "smoothgrad" / "001_FLAIR.nii.gz").write_bytes(b"not an image")
    with pytest.raises(FeatureError, match="001_FLAIR.nii.gz: not a readable image"):
        instance_features(tmp_path)
