"""Comparison: bootstrap CIs, paired differences with Wilcoxon p, outputs, bad input."""
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from nnxai.cli import main
from nnxai.comparison import Entry, compare_entries, parse_entry, summarize, wilcoxon_p
from nnxai.evaluation import COUNT_COLUMNS, EvaluationInputError, overall_table, with_metrics


def per_case_table(*cases: dict) -> pd.DataFrame:
    """Per-case counts (unspecified counts 0) with metrics, cases named c0, c1, ..."""
    rows = [{"case": f"c{i}", **dict.fromkeys(COUNT_COLUMNS, 0), "voxels": 1000, **counts}
            for i, counts in enumerate(cases)]
    return with_metrics(pd.DataFrame(rows))


def detections(tp: int, fp: int, fn: int) -> dict:
    return dict(lesion_tp=tp, lesion_tp_gt=tp, lesion_fp=fp, lesion_fn=fn, gt_lesions=tp + fn, pred_lesions=tp + fp)


def test_bootstrap_ci_of_a_two_case_mean():
    # Resampled means of per-case F1 values {0, 1} are 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4.
    table = per_case_table(detections(0, 1, 0), detections(1, 0, 0))
    metrics, _ = summarize({"a": table, "b": table}, n_bootstrap=2000, seed=0)
    row = metrics.set_index(["metric", "aggregate"]).loc[("lesion_f1", "mean_over_cases")]
    assert (row["a"], row["a_ci_low"], row["a_ci_high"]) == (0.5, 0.0, 1.0)


def test_pooled_values_agree_with_evaluation_overall():
    table = per_case_table(detections(2, 1, 0), detections(1, 0, 3), detections(0, 0, 0))
    metrics, _ = summarize({"a": table, "b": table}, n_bootstrap=200, seed=1)
    pooled = metrics[metrics["aggregate"] == "pooled"].set_index("metric")["a"]
    expected = overall_table(table).set_index("metric")["pooled"]
    assert pooled["lesion_f1"] == pytest.approx(3 / (3 + (1 + 3) / 2))
    assert pooled.to_dict() == pytest.approx(expected[pooled.index].to_dict())


def test_paired_differences_against_the_baseline():
    baseline = per_case_table(detections(1, 1, 0), detections(1, 1, 0), detections(1, 1, 0))
    better = per_case_table(detections(1, 0, 0), detections(1, 0, 0), detections(1, 1, 0))
    metrics, differences = summarize({"base": baseline, "new": better}, n_bootstrap=500, seed=0)
    f1 = differences.set_index("metric").loc["lesion_f1"]
    # per-case F1: base 2/3, 2/3, 2/3; new 1, 1, 2/3 -> differences 1/3, 1/3, 0
    assert f1["mean_difference"] == pytest.approx(2 / 9)
    assert (f1["entry"], f1["baseline"], f1["cases"]) == ("new", "base", 3)
    assert 0 <= f1["ci_low"] <= f1["mean_difference"] <= f1["ci_high"] <= 1 / 3 + 1e-12
    # zeros are dropped; two positive differences: exact two-sided p = 2 * (1/2)^2
    assert f1["wilcoxon_p"] == pytest.approx(0.5)
    assert differences.set_index("metric").loc["lesion_tpr", "wilcoxon_p"] == 1.0
    assert not differences.isna().any().any() and not metrics.isna().any().any()


def test_wilcoxon_p_by_hand():
    assert wilcoxon_p(np.array([0.1, 0.2, 0.3])) == pytest.approx(0.25)
    assert wilcoxon_p(np.zeros(4)) == 1.0


def test_bootstrap_is_seeded():
    table = per_case_table(detections(1, 2, 0), detections(3, 0, 1), detections(0, 1, 1), detections(2, 2, 2))
    first, _ = summarize({"a": table, "b": table}, n_bootstrap=300, seed=7)
    again, _ = summarize({"a": table, "b": table}, n_bootstrap=300, seed=7)
    other, _ = summarize({"a": table, "b": table}, n_bootstrap=300, seed=8)
    pd.testing.assert_frame_equal(first, again)
    assert not first.equals(other)


@pytest.mark.parametrize("text, message", [("nofolder", "expected NAME=PRED_DIR"), ("=x", "expected NAME=PRED_DIR"),
                                           ("a=/does/not/exist", "not a folder")])
def test_bad_entries(text, message):
    with pytest.raises(EvaluationInputError, match=message):
        parse_entry(text)


def test_compare_rejects_duplicates_single_entries_and_model_folders(tmp_path):
    (tmp_path / "model" / "fold_0").mkdir(parents=True)
    with pytest.raises(EvaluationInputError, match="unique"):
        compare_entries(tmp_path, [Entry("a", tmp_path), Entry("a", tmp_path)])
    with pytest.raises(EvaluationInputError, match="at least two"):
        compare_entries(tmp_path, [Entry("a", tmp_path)])
    with pytest.raises(EvaluationInputError, match="model folder"):
        compare_entries(tmp_path, [Entry("a", tmp_path), Entry("m", tmp_path / "model")])


def write_masks(folder, masks):
    folder.mkdir()
    for case, mask in masks.items():
        sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8)), str(folder / f"{case}.nii.gz"))
    return folder


def lesion_volume(*corners):
    mask = np.zeros((8, 8, 8), dtype=bool)
    for z, y, x in corners:
        mask[z:z + 2, y:y + 2, x:x + 2] = True
    return mask


@pytest.fixture
def folders(tmp_path):
    gt = write_masks(tmp_path / "gt", {"a": lesion_volume((1, 1, 1)), "b": lesion_volume((4, 4, 4)),
                                       "c": lesion_volume()})
    base = write_masks(tmp_path / "base", {"a": lesion_volume((1, 1, 1), (5, 5, 5)), "b": lesion_volume(),
                                           "c": lesion_volume((0, 5, 0))})
    new = write_masks(tmp_path / "new", {"a": lesion_volume((1, 1, 1)), "b": lesion_volume((4, 4, 4))})
    return gt, base, new


def test_compare_cli_writes_all_outputs(folders, tmp_path):
    gt, base, new = folders
    (new / "c.nii.gz").write_bytes((base / "c.nii.gz").read_bytes())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compare", "--gt", str(gt), f"base={base}", f"new={new}", "-o", str(out),
                                       "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "comparison.png", "differences.csv",
                                                      "metrics.csv", "per_case.csv"]
    assert "| lesion_f1 | mean_over_cases |" in (out / "comparison.md").read_text()
    per_case = pd.read_csv(out / "per_case.csv")
    # case a: base has a TP and an FP lesion, new only the TP; case b: base misses the lesion, new finds it.
    assert per_case.set_index(["entry", "case"])["lesion_f1"].to_dict() == pytest.approx(
        {("base", "a"): 2 / 3, ("base", "b"): 0.0, ("base", "c"): 0.0,
         ("new", "a"): 1.0, ("new", "b"): 1.0, ("new", "c"): 0.0})
    assert list(pd.read_csv(out / "metrics.csv").columns) == ["metric", "aggregate", "base", "base_ci_low",
                                                              "base_ci_high", "new", "new_ci_low", "new_ci_high"]


def test_compare_missing_case_fails_unless_only_common(folders, tmp_path):
    gt, base, new = folders
    out = tmp_path / "out"
    arguments = ["compare", "--gt", str(gt), f"base={base}", f"new={new}", "-o", str(out), "--bootstrap", "100"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0
    assert "only in ground truth: c" in result.output
    assert not out.exists()
    result = CliRunner().invoke(main, [*arguments, "--only-common"])
    assert result.exit_code == 0, result.output
    assert "new: not evaluated: 1 case(s) only in ground truth: c" in result.output
    assert sorted(pd.read_csv(out / "per_case.csv")["case"].unique()) == ["a", "b"]
