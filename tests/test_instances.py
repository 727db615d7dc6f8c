"""Connected components and TP / FP / FN matching on hand-built masks."""
import numpy as np
import pytest

from nnxai.lesions.instances import case_instances, label_components, match_components


def volume(*boxes: tuple[slice, slice, slice], shape=(10, 10, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        mask[box] = True
    return mask


def diagonal_pair(offset: tuple[int, int, int]) -> np.ndarray:
    """Two single voxels: (2, 2, 2) and (2, 2, 2) + offset."""
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[2, 2, 2] = True
    mask[tuple(2 + o for o in offset)] = True
    return mask


@pytest.mark.parametrize("offset, expected", [
    ((1, 0, 0), {6: 1, 18: 1, 26: 1}),  # shared face
    ((1, 1, 0), {6: 2, 18: 1, 26: 1}),  # shared edge
    ((1, 1, 1), {6: 2, 18: 2, 26: 1}),  # shared corner
])
def test_connectivity_decides_whether_touching_voxels_are_one_component(offset, expected):
    mask = diagonal_pair(offset)
    for connectivity, count in expected.items():
        assert label_components(mask, connectivity).max() == count


def test_min_size_drops_small_components_and_renumbers_consecutively():
    mask = volume(np.s_[0:1, 0:1, 0:2], np.s_[3:5, 3:5, 3:5], np.s_[7:8, 7:8, 7:8], np.s_[8:10, 0:3, 0:1])
    labels = label_components(mask, min_size=3)
    assert labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert sorted(np.bincount(labels.ravel())[1:].tolist()) == [6, 8]
    assert not labels[0, 0, 0] and not labels[7, 7, 7]
    assert label_components(mask).max() == 4


def test_empty_mask_has_no_components():
    assert label_components(np.zeros((4, 4, 4))).max() == 0


@pytest.mark.parametrize("bad", [dict(connectivity=8), dict(min_size=0)])
def test_label_components_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        label_components(np.zeros((4, 4, 4)), **bad)


def test_any_overlap_rule_counts_tp_fp_fn():
    # GT lesions: A (1 voxel touched by P1), B (untouched -> FN), C and D both touched by one prediction P3.
    gt = volume(np.s_[0:2, 0:2, 0:2], np.s_[0:2, 7:9, 0:2], np.s_[5:6, 0:1, 5:6], np.s_[5:6, 2:3, 5:6])
    pred = volume(np.s_[1:3, 1:3, 1:3], np.s_[8:10, 8:10, 8:10], np.s_[5:6, 0:3, 5:6])
    pred_labels, gt_labels = label_components(pred), label_components(gt)
    matching = match_components(pred_labels, gt_labels)
    assert [tuple(np.argwhere(pred_labels == i)[0]) for i in matching.fp_pred] == [(8, 8, 8)]
    assert len(matching.tp_pred) == 2
    assert len(matching.tp_gt) == 3
    assert [tuple(np.argwhere(gt_labels == i)[0]) for i in matching.fn_gt] == [(0, 7, 0)]


def test_iou_rule_needs_enough_overlap():
    gt = volume(np.s_[0:4, 0:1, 0:1], np.s_[0:4, 5:6, 0:1])
    # P1 covers GT1 exactly (IoU 1); P2 covers 1 of GT2's 4 voxels plus 3 outside (IoU 1/7).
    pred = volume(np.s_[0:4, 0:1, 0:1], np.s_[3:7, 5:6, 0:1])
    pred_labels, gt_labels = label_components(pred), label_components(gt)
    strict = match_components(pred_labels, gt_labels, rule="iou", iou_threshold=0.25)
    assert (len(strict.tp_pred), len(strict.fp_pred), len(strict.tp_gt), len(strict.fn_gt)) == (1, 1, 1, 1)
    lenient = match_components(pred_labels, gt_labels, rule="iou", iou_threshold=1 / 7)
    assert (len(lenient.tp_pred), len(lenient.fp_pred), len(lenient.fn_gt)) == (2, 0, 0)
    anyrule = match_components(pred_labels, gt_labels)
    assert (len(anyrule.tp_pred), len(anyrule.fp_pred), len(anyrule.fn_gt)) == (2, 0, 0)


def test_match_components_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        match_components(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int))
    with pytest.raises(ValueError, match="rule"):
        match_components(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int), rule="dice")


def test_case_instances_orders_predictions_then_missed_lesions():
    gt = volume(np.s_[0:2, 0:2, 0:2], np.s_[6:8, 6:8, 6:8])
    pred = volume(np.s_[0:2, 0:2, 0:1], np.s_[0:1, 6:9, 0:1], np.s_[9:10, 9:10, 9:10])
    instances = case_instances(pred, gt, min_size=2)
    summary = [(i.instance_id, i.group, int(i.mask.sum())) for i in instances]
    assert summary == [(1, "TP", 4), (2, "FP", 3), (3, "FN", 8)]
    assert instances[2].mask[6:8, 6:8, 6:8].all()
    assert all(i.mask.dtype == bool and i.mask.shape == gt.shape for i in instances)


def test_case_instances_without_ground_truth_are_unknown():
    pred = volume(np.s_[0:2, 0:2, 0:1], np.s_[5:6, 5:6, 5:6])
    assert [(i.instance_id, i.group) for i in case_instances(pred)] == [(1, "unknown"), (2, "unknown")]


def test_case_without_lesions_gives_no_instances():
    empty = np.zeros((5, 5, 5), dtype=bool)
    assert case_instances(empty, empty) == []
    assert [i.group for i in case_instances(empty, volume(np.s_[1:2, 1:2, 1:2], shape=(5, 5, 5)))] == ["FN"]
