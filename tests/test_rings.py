"""Ring analysis on hand-built maps whose shell values are known: distance maps, constants, neighbours."""
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.ndimage import distance_transform_edt

from nnxai.analysis.rings import OUTSIDE, RING_COLUMNS, ring_table, shell_labels
from nnxai.cli import main
from nnxai.explain.output import AnalysisInputError, load_explain_output
from tests.fake_explain_output import FakeInstance, write_output

SHAPE = (15, 15, 9)
CENTRE = (7, 7, 4)


def point_mask():
    mask = np.zeros(SHAPE, bool)
    mask[CENTRE] = True
    return mask


def test_shells_follow_anisotropic_spacing():
    shells = shell_labels(point_mask(), (1.0, 1.0, 2.0), max_mm=2)
    assert shells[CENTRE] == 0
    # 1 mm: the four in-plane neighbours only; the neighbours across slices are 2 mm away
    assert (shells == 1).sum() == 4
    assert shells[7, 8, 4] == 1 and shells[7, 7, 5] == 2
    # (1, 2] mm: 4 in-plane diagonals (1.41), 4 in-plane two steps (2.0), 2 across slices (2.0)
    assert (shells == 2).sum() == 10
    assert shells[8, 8, 4] == 2 and shells[8, 7, 5] == OUTSIDE  # sqrt(1 + 4) > 2


def test_box_crop_gives_the_full_transform():
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 30, 20), bool)
    mask[10:13, 14:18, 8:10] = True
    mask[rng.random(mask.shape) > 0.999] = True
    spacing = (0.8, 1.1, 1.7)
    full = np.ceil(distance_transform_edt(~mask, sampling=spacing) - 1e-6)
    full[full > 6] = OUTSIDE
    assert np.array_equal(shell_labels(mask, spacing, max_mm=6), full)


def test_map_equal_to_distance_lands_in_its_own_shell(tmp_path):
    spacing = (1.0, 1.0, 2.0)
    mask = np.zeros(SHAPE, bool)
    mask[6:9, 6:9, 3:6] = True
    distance = distance_transform_edt(~mask, sampling=spacing)
    instance = FakeInstance(1, "TP", mask, {"FLAIR": distance, "T1": -distance})
    output = load_explain_output(write_output(tmp_path / "out", {"c1": [instance]}, spacing))
    table = ring_table(output, max_mm=4)
    assert list(table.columns) == RING_COLUMNS
    assert len(table) == 2 * 5
    flair = table[table.channel == "FLAIR"].set_index("shell_mm")
    assert flair.loc[0, ["mean", "min", "max"]].tolist() == [0, 0, 0] and flair.loc[0, "voxels"] == 27
    for shell in range(1, 5):
        assert shell - 1 < flair.loc[shell, "min"] <= flair.loc[shell, "max"] <= shell
    assert flair.loc[1, "voxels"] == 4 * 9  # only the in-plane faces at 1 mm
    assert flair.loc[1, "mean"] == pytest.approx(1.0, abs=1e-6)
    t1 = table[table.channel == "T1"].set_index("shell_mm")
    assert np.allclose(t1["mean"], -flair["mean"]) and (t1["voxels"] == flair["voxels"]).all()
    assert set(table.group) == {"TP"} and set(table.case) == {"c1"} and set(table.method) == {"smoothgrad"}


def test_other_instances_are_left_out_of_the_shells(tmp_path):
    first, second = point_mask(), np.zeros(SHAPE, bool)
    second[7, 8, 4] = True  # in the first instance's 1 mm shell
    maps = {"FLAIR": np.ones(SHAPE), "T1": np.zeros(SHAPE)}
    cases = {"c1": [FakeInstance(1, "TP", first, maps), FakeInstance(2, "FN", second, maps)]}
    table = ring_table(load_explain_output(write_output(tmp_path / "out", cases)), max_mm=1)
    shell_one = table[(table.shell_mm == 1) & (table.channel == "FLAIR")].set_index("instance_id")
    assert shell_one.loc[1, "voxels"] == 5 and shell_one.loc[2, "voxels"] == 5  # 6 face neighbours, one taken
    assert shell_one.loc[2, "mean"] == 1.0


def test_empty_shells_are_nan_not_errors(tmp_path):
    mask = np.ones((3, 3, 3), bool)  # fills the volume: no tissue around it
    maps = {"FLAIR": np.full((3, 3, 3), 2.0), "T1": np.zeros((3, 3, 3))}
    table = ring_table(load_explain_output(write_output(tmp_path / "out", {"c": [FakeInstance(1, "FP", mask, maps)]})),
                       max_mm=2)
    flair = table[table.channel == "FLAIR"].set_index("shell_mm")
    assert flair.loc[0, "mean"] == 2.0 and flair.loc[0, "voxels"] == 27
    assert flair.loc[[1, 2], "voxels"].tolist() == [0, 0] and flair.loc[[1, 2], "mean"].isna().all()


def test_cli_writes_rings_csv(tmp_path):
    maps = {"FLAIR": np.ones(SHAPE), "T1": np.zeros(SHAPE)}
    out = write_output(tmp_path / "out", {"001": [FakeInstance(1, "TP", point_mask(), maps)]})
    result = CliRunner().invoke(main, ["experiment", "rings", str(out), "--max-mm", "3"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "rings.csv", dtype={"case": str})
    assert table.case.unique().tolist() == ["001"] and table.shell_mm.max() == 3 and len(table) == 8


def test_bad_inputs_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(main, ["experiment", "rings", str(tmp_path)])
    assert result.exit_code != 0 and "run.json: missing" in result.output
    maps = {"FLAIR": np.ones(SHAPE), "T1": np.zeros(SHAPE)}
    out = write_output(tmp_path / "out", {"c": [FakeInstance(1, "TP", point_mask(), maps)]})
    (out / "c" / "smoothgrad" / "001_T1.nii.gz").unlink()
    with pytest.raises(AnalysisInputError, match="001_T1.nii.gz: missing"):
        ring_table(load_explain_output(out))
    result = CliRunner().invoke(main, ["experiment", "rings", str(out)])
    assert result.exit_code != 0 and "001_T1.nii.gz: missing" in result.output
    assert not (out / "rings.csv").exists()
    (out / "instances.csv").write_text("case,voxels\nc,1\n")
    with pytest.raises(AnalysisInputError, match="instances.csv: missing column"):
        load_explain_output(out)
