"""The study's loss (trainers/wml_loss.py) against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from trainers.wml_loss import FocalLoss, NDSCFocalLoss, SoftNormalizedDiceLoss


def two_class_logits(lesion_probabilities: list[float]) -> torch.Tensor:
    """(1, 2, 1, 1, n) logits whose softmax gives the listed lesion probabilities."""
    p = torch.tensor(lesion_probabilities, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).view(1, 2, 1, 1, -1)


def labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, 1, -1)


# Case A: GT [1, 1, 0, 0], p = [0.8, 0.6, 0.3, 0.1]; soft TP = 1.4, FP = 0.4, FN = 0.6.
CASE_A_PROBS, CASE_A_LABELS = [0.8, 0.6, 0.3, 0.1], [1, 1, 0, 0]
# r = 0.25, N = 4, |GT| = 2: k = 0.75 * 2 / (0.25 * 2) = 3; nDSC = 2.8 / (2.8 + 3 * 0.4 + 0.6) = 2.8 / 4.6
CASE_A_NDSC_LOSS_R025 = 1 - 2.8 / 4.6
# p_t = [0.8, 0.6, 0.7, 0.9]; focal_i = -(1 - p_t)^2 ln p_t, averaged
CASE_A_FOCAL = (0.04 * -math.log(0.8) + 0.16 * -math.log(0.6) + 0.09 * -math.log(0.7) + 0.01 * -math.log(0.9)) / 4


def test_ndsc_term_matches_hand_computed_value():
    loss = SoftNormalizedDiceLoss(r=0.25)(two_class_logits(CASE_A_PROBS), labels(CASE_A_LABELS))
    assert loss.item() == pytest.approx(CASE_A_NDSC_LOSS_R025, abs=1e-5)


def test_ndsc_with_study_r_weighs_false_positives_by_lesion_load():
    # 1000 voxels, 1 lesion voxel: |GT| / N equals r = 0.001, so k = 0.999 / (0.001 * 999) = 1 (plain soft Dice).
    # GT voxel p = 0.5, one background voxel p = 0.5, the rest ~0: TP = FP = FN = 0.5, nDSC = 1 / 2.
    probs = torch.full((1000,), 1e-12, dtype=torch.float64)
    probs[0] = probs[1] = 0.5
    target = torch.zeros(1000)
    target[0] = 1
    logits = two_class_logits(probs.tolist()).view(1, 2, 10, 10, 10)
    loss = SoftNormalizedDiceLoss()(logits, target.view(1, 1, 10, 10, 10))
    assert loss.item() == pytest.approx(0.5, abs=1e-5)
    # a tenfold lesion load makes each false positive ~ten times dearer: k = 0.999 * 10 / (0.001 * 990) = 10.09
    target[:10] = 1
    probs[:10] = 0.5
    probs[10] = 0.5
    logits = two_class_logits(probs.tolist()).view(1, 2, 10, 10, 10)
    k = 0.999 * 10 / (0.001 * 990)
    expected = 1 - 10 / (10 + k * 0.5 + 5)
    assert SoftNormalizedDiceLoss()(logits, target.view(1, 1, 10, 10, 10)).item() == pytest.approx(expected, abs=1e-5)


def test_focal_term_matches_hand_computed_value():
    loss = FocalLoss()(two_class_logits(CASE_A_PROBS), labels(CASE_A_LABELS))
    assert loss.item() == pytest.approx(CASE_A_FOCAL, abs=1e-7)


def test_focal_with_gamma_zero_is_cross_entropy():
    loss = FocalLoss(gamma=0)(two_class_logits(CASE_A_PROBS), labels(CASE_A_LABELS))
    expected = -(math.log(0.8) + math.log(0.6) + math.log(0.7) + math.log(0.9)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-7)


def test_compound_weights_are_half_ndsc_plus_one_focal():
    loss = NDSCFocalLoss(r=0.25)(two_class_logits(CASE_A_PROBS), labels(CASE_A_LABELS))
    assert loss.item() == pytest.approx(0.5 * CASE_A_NDSC_LOSS_R025 + CASE_A_FOCAL, abs=1e-5)


def test_perfect_prediction_gives_zero_loss():
    target = labels([1, 0, 0, 1, 0])
    lesion_logit = 20 * (2 * target - 1)
    logits = torch.cat([-lesion_logit, lesion_logit], dim=1)
    assert NDSCFocalLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_empty_ground_truth_leaves_false_positives_to_the_focal_term():
    logits, target = two_class_logits([0.5, 0.2, 0.1]), labels([0, 0, 0])
    assert SoftNormalizedDiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-9)
    expected_focal = (0.25 * -math.log(0.5) + 0.04 * -math.log(0.8) + 0.01 * -math.log(0.9)) / 3
    assert NDSCFocalLoss()(logits, target).item() == pytest.approx(expected_focal, abs=1e-7)


def test_per_sample_and_batch_reduction():
    # sample 1 = case A; sample 2: empty GT, p = [0.5, ~0, ~0, ~0]
    logits = torch.cat([two_class_logits(CASE_A_PROBS), two_class_logits([0.5, 1e-12, 1e-12, 1e-12])])
    target = torch.cat([labels(CASE_A_LABELS), labels([0, 0, 0, 0])])
    per_sample = SoftNormalizedDiceLoss(r=0.25)(logits, target)
    assert per_sample.item() == pytest.approx(CASE_A_NDSC_LOSS_R025 / 2, abs=1e-5)
    # pooled: N = 8, |GT| = 2, k = 0.75 * 2 / (0.25 * 6) = 1; TP = 1.4, FP = 0.9, FN = 0.6
    pooled = SoftNormalizedDiceLoss(r=0.25, batch_dice=True)(logits, target)
    assert pooled.item() == pytest.approx(1 - 2.8 / (2.8 + 0.9 + 0.6), abs=1e-5)


def test_ignore_label_voxels_count_for_nothing():
    # case A plus two voxels labelled 2 (ignore) with confident wrong predictions: same loss as case A alone
    logits = two_class_logits(CASE_A_PROBS + [0.99, 0.01])
    target = labels(CASE_A_LABELS + [2, 2])
    loss = NDSCFocalLoss(r=0.25, ignore_label=2)(logits, target)
    assert loss.item() == pytest.approx(0.5 * CASE_A_NDSC_LOSS_R025 + CASE_A_FOCAL, abs=1e-5)


def test_ndsc_averages_over_foreground_classes():
    # three classes; class 1 predicted perfectly, class 2 missed entirely: losses ~0 and ~1, mean 0.5
    target = labels([1, 2, 0, 0])
    logits = torch.full((1, 3, 1, 1, 4), -20.0, dtype=torch.float64)
    logits[0, 1, 0, 0, 0] = logits[0, 0, 0, 0, 1:] = 20.0
    assert SoftNormalizedDiceLoss(r=0.25)(logits, target).item() == pytest.approx(0.5, abs=1e-4)


def test_gradient_raises_lesion_logit_where_lesion_is_missed():
    logits = two_class_logits(CASE_A_PROBS).requires_grad_()
    NDSCFocalLoss(r=0.25)(logits, labels(CASE_A_LABELS)).backward()
    lesion_grad = logits.grad[0, 1, 0, 0]
    assert torch.all(lesion_grad[:2] < 0) and torch.all(lesion_grad[2:] > 0)


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="r must lie"):
        SoftNormalizedDiceLoss(r=0)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
