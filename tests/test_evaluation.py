"""Voxel and lesion metrics against hand-computed values, empty-case conventions, folder input and bad input."""
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from nnxai.cli import main
from nnxai.lesions.evaluation import (EvaluationInputError, InstanceOptions, case_counts, evaluate_folders,
                                      metrics_from_counts, overall_path)


def counts(**values):
    base = dict(voxels=1000, gt_voxels=0, pred_voxels=0, overlap_voxels=0,
                lesion_tp=0, lesion_tp_gt=0, lesion_fp=0, lesion_fn=0)
    return {**base, **values}


def write_mask(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(np.asarray(array).astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def cube(shape=(8, 8, 8), *boxes):
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        mask[box] = True
    return mask


def test_voxel_metrics_by_hand():
    # |G| = 2 of N = 1001 voxels: k = 0.999 * 2 / (0.001 * 999) = 2. TP 1, FP 2, FN 1.
    metrics = metrics_from_counts(counts(voxels=1001, gt_voxels=2, pred_voxels=3, overlap_voxels=1))
    assert metrics["dice"] == pytest.approx(2 / 5)
    assert metrics["ndsc"] == pytest.approx(2 / (2 + 2 * 2 + 1))
    # N = 1000 |G| gives k = 1: nDSC equals Dice.
    metrics = metrics_from_counts(counts(voxels=10000, gt_voxels=10, pred_voxels=12, overlap_voxels=8))
    assert metrics["ndsc"] == pytest.approx(metrics["dice"]) == pytest.approx(16 / 22)


def test_lesion_metrics_by_hand():
    # 2 predicted TP lesions covering 3 GT lesions, 1 FP, 1 missed GT lesion.
    metrics = metrics_from_counts(counts(lesion_tp=2, lesion_tp_gt=3, lesion_fp=1, lesion_fn=1))
    expected = dict(lesion_tpr=3 / 4, lesion_fnr=1 / 4, lesion_ppv=2 / 3, lesion_fdr=1 / 3, lesion_f1=2 / 3)
    assert {k: float(metrics[k]) for k in expected} == pytest.approx(expected)


EMPTY = cube()
LESION = cube((8, 8, 8), np.s_[1:3, 1:3, 1:3])


@pytest.mark.parametrize("pred, gt, expected", [
    (EMPTY, EMPTY, dict(dice=1, ndsc=1, lesion_tpr=1, lesion_fnr=0, lesion_ppv=1, lesion_fdr=0, lesion_f1=1)),
    (LESION, EMPTY, dict(dice=0, ndsc=0, lesion_tpr=1, lesion_fnr=0, lesion_ppv=0, lesion_fdr=1, lesion_f1=0)),
    (EMPTY, LESION, dict(dice=0, ndsc=0, lesion_tpr=0, lesion_fnr=1, lesion_ppv=1, lesion_fdr=0, lesion_f1=0)),
], ids=["both-empty", "empty-gt", "empty-prediction"])
def test_empty_case_conventions(pred, gt, expected):
    metrics = metrics_from_counts(case_counts(pred, gt))
    assert {k: float(v) for k, v in metrics.items()} == expected


def test_case_counts_on_hand_built_masks():
    gt = cube((10, 10, 10), np.s_[0:2, 0:2, 0:2], np.s_[0:2, 7:9, 0:2], np.s_[5:6, 0:1, 5:6], np.s_[5:6, 2:3, 5:6])
    pred = cube((10, 10, 10), np.s_[1:3, 1:3, 1:3], np.s_[8:10, 8:10, 8:10], np.s_[5:6, 0:3, 5:6], np.s_[9, 0, 0])
    result = case_counts(pred, gt, InstanceOptions(min_size=2))
    # The 1-voxel prediction at (9, 0, 0) is dropped by min_size before anything is counted.
    assert result == dict(voxels=1000, gt_voxels=18, pred_voxels=19, overlap_voxels=3, gt_lesions=4,
                          pred_lesions=3, lesion_tp=2, lesion_tp_gt=3, lesion_fp=1, lesion_fn=1)


def make_folders(tmp_path, gt_masks, pred_masks, file_ending=".nii.gz"):
    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "predictions"
    for folder, masks in ((gt_dir, gt_masks), (pred_dir, pred_masks)):
        folder.mkdir()
        for case, mask in masks.items():
            write_mask(folder / f"{case}{file_ending}", mask)
    return gt_dir, pred_dir


def test_overall_pools_counts_and_averages_cases(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, {"a": LESION, "b": LESION}, {"a": LESION, "b": EMPTY})
    evaluation = evaluate_folders(gt_dir, pred_dir)
    assert evaluation.per_case["case"].tolist() == ["a", "b"]
    assert evaluation.per_case["dice"].tolist() == [1.0, 0.0]
    overall = evaluation.overall.set_index("metric")
    # pooled Dice: 2 * 8 / (8 + 16); pooled F1: 1 / (1 + (0 + 1) / 2)
    assert overall.loc["dice"].tolist() == pytest.approx([0.5, 2 / 3])
    assert overall.loc["lesion_f1"].tolist() == pytest.approx([0.5, 2 / 3])
    assert overall.loc["lesion_tpr"].tolist() == pytest.approx([0.5, 0.5])
    assert overall.loc["lesion_fn"].tolist() == [0.5, 1.0]
    assert not evaluation.overall.isna().any().any()


def test_file_ending_comes_from_dataset_json(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, {"a": LESION}, {"a": LESION}, file_ending=".mha")
    (pred_dir / "dataset.json").write_text(json.dumps({"file_ending": ".mha"}))
    write_mask(pred_dir / "stray.nii.gz", EMPTY)
    evaluation = evaluate_folders(gt_dir, pred_dir)
    assert evaluation.per_case["case"].tolist() == ["a"]


def test_case_in_one_folder_only_is_an_error_unless_only_common(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, {"a": LESION, "b": LESION}, {"a": LESION, "c": LESION})
    expected = r"1 case\(s\) only in ground truth: b; 1 case\(s\) only in predictions: c"
    with pytest.raises(EvaluationInputError, match=expected):
        evaluate_folders(gt_dir, pred_dir)
    evaluation = evaluate_folders(gt_dir, pred_dir, only_common=True)
    assert evaluation.per_case["case"].tolist() == ["a"]
    assert (evaluation.pairing.only_in_ground_truth, evaluation.pairing.only_in_predictions) == (["b"], ["c"])


def test_bad_cases_are_all_reported_with_their_file(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, {"good": LESION, "geometry": LESION, "labels": LESION},
                                    {"good": LESION, "labels": LESION * 2})
    write_mask(pred_dir / "geometry.nii.gz", LESION, spacing=(1.0, 1.0, 2.0))
    with pytest.raises(EvaluationInputError) as error:
        evaluate_folders(gt_dir, pred_dir)
    assert len(error.value.problems) == 2
    geometry, labels = error.value.problems
    assert "geometry.nii.gz: spacing (1.0, 1.0, 2.0) differs from ground truth" in geometry
    assert "labels.nii.gz: not a binary mask (values other than 0 and 1: 2)" in labels


@pytest.mark.parametrize("change, message", [
    (lambda image: image.SetOrigin((0.0, 0.0, 3.0)), r"origin \(0.0, 0.0, 3.0\) differs from ground truth"),
    (lambda image: image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
     r"direction \(0.0, 1.0, 0.0, 1.0, .*\) differs from ground truth"),
], ids=["origin", "direction"])
def test_prediction_elsewhere_in_the_scanner_is_refused_by_evaluate_and_compare(tmp_path, change, message):
    gt_dir, pred_dir = make_folders(tmp_path, {"a": LESION, "b": LESION}, {"a": LESION, "b": LESION})
    image = sitk.ReadImage(str(pred_dir / "b.nii.gz"))
    change(image)  # same voxels, shape and spacing
    sitk.WriteImage(image, str(pred_dir / "b.nii.gz"))
    with pytest.raises(EvaluationInputError, match=f"b.nii.gz: {message}") as error:
        evaluate_folders(gt_dir, pred_dir)
    assert len(error.value.problems) == 1
    out = tmp_path / "comparison"
    result = CliRunner().invoke(main, ["compare", "--gt", str(gt_dir), f"one={pred_dir}", f"two={pred_dir}",
                                       "-o", str(out), "--bootstrap", "100"])
    assert result.exit_code != 0 and not out.exists()
    assert re.search(f"b.nii.gz: {message}", result.output)


def test_unreadable_file_is_reported(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, {"a": LESION}, {})
    (pred_dir / "a.nii.gz").write_bytes(b"not an image")
    with pytest.raises(EvaluationInputError, match="a.nii.gz: cannot read image"):
        evaluate_folders(gt_dir, pred_dir)


def test_evaluate_cli_writes_both_tables(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, {"a": LESION, "b": LESION}, {"a": LESION, "b": EMPTY})
    output = tmp_path / "out" / "metrics.csv"
    result = CliRunner().invoke(main, ["evaluate", str(gt_dir), str(pred_dir), "-o", str(output),
                                       "--connectivity", "26", "--rule", "iou"])
    assert result.exit_code == 0, result.output
    assert "dice" in result.output and "pooled" in result.output
    assert output.read_text().splitlines()[0].startswith("case,voxels,")
    assert overall_path(output).read_text().splitlines()[0] == "metric,mean_over_cases,pooled"
    assert sorted(p.name for p in output.parent.iterdir()) == ["metrics.csv", "metrics_overall.csv"]


def test_evaluate_cli_bad_input_fails_without_output(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, {"a": LESION, "b": LESION}, {"a": LESION})
    output = tmp_path / "metrics.csv"
    result = CliRunner().invoke(main, ["evaluate", str(gt_dir), str(pred_dir), "-o", str(output)])
    assert result.exit_code != 0
    assert "only in ground truth: b" in result.output
    assert not output.exists()
