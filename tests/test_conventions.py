"""Named lesion-matching conventions against the benchmarks' own definitions, re-implemented here from their
published code (Shifts 2.0 `mswml/metrics.py`, the WMH 2017 challenge's `evaluation.py`, MSSEG-2016's
animaSegPerfAnalyzer), on masks where the conventions disagree: touching, diagonal-only and merged lesions."""
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from scipy import ndimage

from nnxai.cli import main
from nnxai.lesions.evaluation import (EvaluationInputError, InstanceOptions, case_counts, convention_options,
                                      evaluate_folders, metrics_from_counts)

SHAPE = (10, 10, 30)
BOX = {  # (z, y, x) blocks of 2 x 2 x 2 voxels unless said otherwise
    "edge_a": np.s_[1:3, 1:3, 1:3], "edge_b": np.s_[3:5, 3:5, 1:3],  # share an edge: 18- and 26-connected
    "corner_c": np.s_[1:3, 1:3, 8:10], "corner_d": np.s_[3:5, 3:5, 10:12],  # share a corner: 26-connected only
    "merged_e": np.s_[1:3, 1:3, 15:17], "merged_f": np.s_[1:3, 1:3, 19:21],  # two GT lesions ...
    "merged_g": np.s_[0:3, 1:3, 15:21],  # ... under one predicted lesion of 36 voxels (IoU 8/36 with each)
    "touch_k": np.s_[6:8, 1:3, 1:3], "touch_l": np.s_[8:10, 1:3, 1:3],  # share a face: one lesion for all
    "missed": np.s_[6:8, 1:3, 24:26], "false": np.s_[6:8, 6:8, 24:26],
    "other_pathology": np.s_[5:9, 5:9, 23:27],  # WMH label 2, around the false positive
}


def blocks(*names):
    mask = np.zeros(SHAPE, dtype=bool)
    for name in names:
        mask[BOX[name]] = True
    return mask


GT = blocks("edge_a", "edge_b", "corner_c", "corner_d", "merged_e", "merged_f", "touch_k", "touch_l", "missed")
PRED = blocks("edge_a", "edge_b", "corner_c", "merged_g", "touch_k", "false")
WMH_GT = np.where(blocks("other_pathology"), 2, GT.astype(np.uint8))


def shifts_reference(gt, pred, iou_threshold=0.25, r=0.001):
    """Shifts' lesion_f1_score and dice_norm_metric as published (scipy.ndimage.label, max IoU per lesion)."""
    pred_labels, n_pred = ndimage.label(pred)
    gt_labels, n_gt = ndimage.label(gt)

    def best_iou(labels, lesion, other_labels):
        mask = labels == lesion
        ious = [0.0]
        for other in np.unique(other_labels[mask]):
            if other:
                other_mask = other_labels == other
                ious.append((mask & other_mask).sum() / (mask | other_mask).sum())
        return max(ious)

    tp = sum(best_iou(pred_labels, p, gt_labels) >= iou_threshold for p in range(1, n_pred + 1))
    fp = n_pred - tp
    fn = sum(best_iou(gt_labels, g, pred_labels) < iou_threshold for g in range(1, n_gt + 1))
    f1 = 1.0 if tp + 0.5 * (fp + fn) == 0 else tp / (tp + 0.5 * (fp + fn))
    gt_f, seg = gt.astype(float), pred.astype(float)
    if gt_f.sum() + seg.sum() == 0:
        return f1, 1.0
    k = 1.0 if gt_f.sum() == 0 else (1 - r) * gt_f.sum() / (r * (gt_f.size - gt_f.sum()))
    true_positive, false_positive, false_negative = seg[gt_f == 1].sum(), seg[gt_f == 0].sum(), gt_f[seg == 0].sum()
    return f1, 2 * true_positive / (k * false_positive + 2 * true_positive + false_negative)


def wmh_reference(gt_labels, pred):
    """The WMH 2017 challenge's getImages + getLesionDetection: label 2 masked out, fully connected components."""
    test = sitk.GetImageFromArray((gt_labels == 1).astype(np.uint8))
    result = sitk.Mask(sitk.GetImageFromArray(pred.astype(np.uint8)),
                       sitk.GetImageFromArray((gt_labels != 2).astype(np.uint8)))
    components = sitk.ConnectedComponentImageFilter()
    components.SetFullyConnected(True)

    def labels_present(image):
        return len(np.unique(sitk.GetArrayFromImage(image))) - 1

    test_components = components.Execute(test)
    n_wmh = labels_present(test_components)
    detected = labels_present(sitk.Multiply(test_components, sitk.Cast(result, sitk.sitkUInt32)))
    recall = 1.0 if n_wmh == 0 else detected / n_wmh
    result_components = components.Execute(result)
    n_detections = labels_present(result_components)
    hits = labels_present(sitk.Multiply(result_components, sitk.Cast(test, sitk.sitkUInt32)))
    precision = 1.0 if n_detections == 0 else hits / n_detections
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return recall, f1


def write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path):
    write(tmp_path / "gt" / "case.nii.gz", GT)
    write(tmp_path / "wmh_gt" / "case.nii.gz", WMH_GT)
    write(tmp_path / "pred" / "case.nii.gz", PRED)
    return tmp_path


def per_case(folder, gt, convention):
    evaluation = evaluate_folders(folder / gt, folder / "pred", convention_options(convention))
    return evaluation.per_case.iloc[0]


def test_shifts_convention_matches_shifts_metrics(folders):
    f1, ndsc = shifts_reference(GT, PRED)
    # 6-connected: edge a, b, corner c (TP) and the touching pair (IoU 1/2, TP); merged g has IoU 2/9 with
    # each GT lesion under it (FP, two FN); corner d and the missed lesion (FN), the false one (FP)
    assert f1 == pytest.approx(4 / (4 + (2 + 4) / 2))
    row = per_case(folders, "gt", "shifts")
    assert (row.lesion_tp, row.lesion_fp, row.lesion_fn) == (4, 2, 4)
    assert row.lesion_f1 == pytest.approx(f1)
    assert row.ndsc == pytest.approx(ndsc)


def test_wmh2017_convention_matches_the_challenge(folders):
    recall, f1 = wmh_reference(WMH_GT, PRED)
    # 26-connected: {a, b}, {c, d}, e, f, {k, l}, missed; all but the missed one are hit: recall 5/6.
    # The false positive lies in label 2 and is removed: precision 4/4.
    assert (recall, f1) == pytest.approx((5 / 6, 2 * (5 / 6) / (1 + 5 / 6)))
    row = per_case(folders, "wmh_gt", "wmh2017")
    assert row.lesion_tpr == pytest.approx(recall)
    assert row.lesion_f1 == pytest.approx(f1)
    assert row.lesion_ppv == 1.0


def test_the_conventions_disagree_on_these_masks(folders):
    study = per_case(folders, "gt", "study")
    # 18-connected: {a, b}, c, d, e, f, {k, l}, missed; TP predictions {a, b}, c, g, {k, l}; FP: false
    assert (study.gt_lesions, study.lesion_tp, study.lesion_tp_gt, study.lesion_fp, study.lesion_fn) == (7, 4, 5, 1, 2)
    assert study.lesion_f1 == pytest.approx(4 / (4 + 3 / 2))
    f1 = {name: per_case(folders, gt, name).lesion_f1 for name, gt in
          (("study", "gt"), ("shifts", "gt"), ("wmh2017", "wmh_gt"), ("msseg", "gt"))}
    assert len({round(value, 6) for value in f1.values()}) == 4, f1


def test_wmh_label_two_is_refused_by_other_conventions(folders):
    with pytest.raises(EvaluationInputError, match=r"case.nii.gz: not a binary mask \(values other than 0 and 1: 2\)"):
        per_case(folders, "wmh_gt", "study")


def test_msseg_detection_rule_and_minimum_volume():
    gt, pred = np.zeros((6, 10, 40), bool), np.zeros((6, 10, 40), bool)
    gt[1:4, 1:4, 1:4] = True  # A, 27 voxels, inside a 108-voxel prediction: 75 % of it outside A (> 70 %)
    pred[1:4, 1:4, 1:13] = True
    gt[1:4, 1:4, 20:23] = True  # B, 27 voxels, 2 of them covered (7 % <= 10 %) by a 4-voxel prediction
    pred[1:3, 1, 22:24] = True
    gt[1:4, 1:4, 30:33] = True  # C, 27 voxels, covered by a 45-voxel prediction: 40 % outside
    pred[1:4, 1:4, 30:35] = True
    gt[1, 6, 1:4] = True  # 3 voxels = 3 mm^3: not a lesion for MSSEG, and not a prediction either
    pred[1, 6, 1:4] = True
    counts = case_counts(pred, gt, convention_options("msseg"))
    # GT side: A is covered by a component too much outside (FN), B too little (FN), C detected.
    # Prediction side: A's component is 25 % covered by A, which is all inside it (TP); B's is half covered
    # by B, of which 25 of 27 voxels lie outside it (FP); C's is detected (TP).
    assert {k: counts[k] for k in ("gt_lesions", "pred_lesions", "lesion_tp", "lesion_tp_gt", "lesion_fp",
                                   "lesion_fn")} == dict(gt_lesions=3, pred_lesions=3, lesion_tp=2, lesion_tp_gt=1,
                                                         lesion_fp=1, lesion_fn=2)
    assert counts["gt_voxels"] == 84 and counts["pred_voxels"] == 160  # the small ones still count as voxels
    metrics = metrics_from_counts(counts, "harmonic")
    assert float(metrics["lesion_f1"]) == pytest.approx(2 * (2 / 3) * (1 / 3) / (2 / 3 + 1 / 3))
    # at 0.5 mm spacing a lesion needs more than 24 voxels: 27-voxel lesions count, 4-voxel ones do not
    small_voxels = case_counts(pred, gt, convention_options("msseg"), voxel_volume_mm3=0.125)
    assert (small_voxels["gt_lesions"], small_voxels["pred_lesions"]) == (3, 2)


def test_msseg_checks_components_largest_overlap_first():
    gt, pred = np.zeros((4, 4, 20), bool), np.zeros((4, 4, 20), bool)
    gt[1:3, 1:3, 1:11] = True  # 40 voxels, 32 of them covered by two components:
    pred[1:3, 1:3, 1:8] = True  # 28 inside it: 28 / 32 >= 65 % of the covered voxels, so checks stop here
    pred[0:4, 0:4, 10:13] = True  # 4 in it, 44 of 48 voxels outside (92 %): never checked
    counts = case_counts(pred, gt, convention_options("msseg"))
    assert (counts["lesion_tp_gt"], counts["lesion_fn"]) == (1, 0)
    # the second component is 4 / 48 covered (<= 10 %): a false positive
    assert (counts["lesion_tp"], counts["lesion_fp"]) == (1, 1)


def test_benchmark_conventions_fix_their_matching():
    assert convention_options("study", connectivity=26, min_size=6) == InstanceOptions(connectivity=26, min_size=6)
    assert convention_options("shifts", min_size=6).min_size == 6  # post-processing stays the user's
    with pytest.raises(EvaluationInputError, match="--connectivity: the shifts convention fixes it"):
        convention_options("shifts", connectivity=18)
    with pytest.raises(EvaluationInputError, match="--rule: the wmh2017 convention fixes it"):
        convention_options("wmh2017", rule="iou")


def test_compare_pools_f1_by_the_convention(folders, tmp_path):
    write(folders / "pred2" / "case.nii.gz", PRED)
    write(folders / "wmh_gt" / "second.nii.gz", WMH_GT)
    for name in ("pred", "pred2"):
        write(folders / name / "second.nii.gz", blocks("edge_a"))  # finds 1 of 6 GT lesions, no false one
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compare", "--gt", str(folders / "wmh_gt"), f"a={folders / 'pred'}",
                                       f"b={folders / 'pred2'}", "-o", str(out), "--bootstrap", "100",
                                       "--convention", "wmh2017"])
    assert result.exit_code == 0, result.output
    assert "convention wmh2017" in (out / "comparison.md").read_text()
    metrics = pd.read_csv(out / "metrics.csv").set_index(["metric", "aggregate"])["a"]
    # pooled over both cases: PPV 5 / 5, TPR (5 + 1) / 12; F1 their harmonic mean
    assert metrics[("lesion_f1", "pooled")] == pytest.approx(2 * 0.5 / 1.5)


def test_cli_convention_names_what_it_used(folders):
    result = CliRunner().invoke(main, ["evaluate", str(folders / "wmh_gt"), str(folders / "pred"),
                                       "--convention", "wmh2017"])
    assert result.exit_code == 0, result.output
    assert "convention wmh2017, connectivity 26" in result.output and "GT label 2 ignored" in result.output
    result = CliRunner().invoke(main, ["evaluate", str(folders / "gt"), str(folders / "pred"),
                                       "--convention", "msseg", "--rule", "iou"])
    assert result.exit_code != 0 and "--rule: the msseg convention fixes it" in result.output
