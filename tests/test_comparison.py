"""Comparison: bootstrap CIs, paired differences with Wilcoxon p, outputs, model-folder entries, bad input."""
import os

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnxai.analysis.comparison import Entry, ModelPrediction, compare_entries, parse_entry, summarize, wilcoxon_p
from nnxai.cli import main
from nnxai.lesions.evaluation import COUNT_COLUMNS, EvaluationInputError, evaluate_folders, overall_table, with_metrics
from tests.fake_model import write_case, write_model_folder


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


@pytest.fixture(scope="module")
def model_cohort(tmp_path_factory):
    """A two-fold tiny nnU-Net model folder and two oblique, anisotropic cases with their labels."""
    root = tmp_path_factory.mktemp("model_compare")
    write_model_folder(root / "model")
    # fold 1: fold 0 with a higher lesion bias, so that the two-fold ensemble differs from either fold
    checkpoint = torch.load(root / "model" / "fold_0" / "checkpoint_final.pth", weights_only=False)
    bias = next(k for k in checkpoint["network_weights"] if "seg_layers" in k and k.endswith("bias"))
    checkpoint["network_weights"][bias] = checkpoint["network_weights"][bias] + torch.tensor([-1.0, 1.0])
    checkpoint["init_args"]["fold"] = 1
    (root / "model" / "fold_1").mkdir()
    torch.save(checkpoint, root / "model" / "fold_1" / "checkpoint_final.pth")
    for i in range(2):
        write_case(root / "images", f"case_{i}", seed=i, labels_dir=root / "labels")
    return root


def test_compare_predicts_model_folders_with_nnunet(model_cohort, tmp_path):
    root = model_cohort
    prediction = ModelPrediction(root / "images", tmp_path / "cache", use_mirroring=False)
    entries = [Entry("model", root / "model"), Entry("truth", root / "labels")]
    comparison = compare_entries(root / "labels", entries, n_bootstrap=100, prediction=prediction)
    cached = tmp_path / "cache" / "model"
    # nnU-Net's own predictor, loading the same two folds itself, gives the same masks
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(root / "model"), (0, 1))
    (tmp_path / "reference").mkdir()
    predictor.predict_from_files_sequential(str(root / "images"), str(tmp_path / "reference"))
    for case in ("case_0", "case_1"):
        ours = sitk.ReadImage(str(cached / f"{case}.nii.gz"))
        reference = sitk.ReadImage(str(tmp_path / "reference" / f"{case}.nii.gz"))
        source = sitk.ReadImage(str(root / "images" / f"{case}_0000.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
        assert sitk.GetArrayFromImage(ours).sum() > 50
        assert ours.GetSize() == source.GetSize() and np.allclose(ours.GetDirection(), source.GetDirection())
    per_case = comparison.per_case.set_index(["entry", "case"])
    assert (per_case.loc["truth", "lesion_f1"] == 1.0).all()
    expected = evaluate_folders(root / "labels", cached).per_case.set_index("case")
    pd.testing.assert_frame_equal(per_case.loc["model"][expected.columns], expected)

    record = (cached / "nnxai_prediction.json").stat().st_mtime_ns
    compare_entries(root / "labels", entries, n_bootstrap=100, prediction=prediction)
    assert (cached / "nnxai_prediction.json").stat().st_mtime_ns == record  # reused
    image = root / "images" / "case_1_0001.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    compare_entries(root / "labels", entries, n_bootstrap=100, prediction=prediction)
    assert (cached / "nnxai_prediction.json").stat().st_mtime_ns != record  # an input changed: predicted again
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]


def test_compare_cli_with_a_model_folder(model_cohort, tmp_path):
    root = model_cohort
    arguments = ["compare", "--gt", str(root / "labels"), f"model={root / 'model'}", f"truth={root / 'labels'}",
                 "-o", str(tmp_path / "out"), "--bootstrap", "100"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code != 0 and "give the images to predict (--images)" in result.output
    result = CliRunner().invoke(main, [*arguments, "--images", str(root / "images"), "-device", "cpu",
                                       "--disable-tta"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out" / "predictions" / "model").glob("*.nii.gz")) == [
        "case_0.nii.gz", "case_1.nii.gz"]
    assert "| lesion_f1 | mean_over_cases |" in (tmp_path / "out" / "comparison.md").read_text()


def test_model_folder_without_images_is_refused(model_cohort, tmp_path):
    (tmp_path / "empty").mkdir()
    prediction = ModelPrediction(tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(EvaluationInputError, match=r"empty: no input images CASE_0000.nii.gz \(entry model\)"):
        compare_entries(model_cohort / "labels", [Entry("model", model_cohort / "model"),
                                                  Entry("truth", model_cohort / "labels")], prediction=prediction)
    assert not (tmp_path / "cache").exists()
