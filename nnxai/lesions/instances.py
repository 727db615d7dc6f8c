"""Lesion instances: connected components of binary masks and their TP / FP / FN matching (SPEC section 2).

A predicted instance is a connected component of the prediction; it is a true positive (TP) when it matches a
ground-truth lesion and a false positive (FP) otherwise. A ground-truth lesion that no predicted instance
matches is a false negative (FN). Two matching rules:

- ``"any"`` (default, as in the study): a predicted component and a GT lesion match when they share a voxel.
- ``"iou"`` (as in the Shifts benchmark): they match when their intersection over union is >= ``iou_threshold``;
  a predicted component is TP when its best IoU with any GT lesion reaches the threshold, a GT lesion is FN
  when its best IoU with any predicted component stays below it.
- ``"msseg"`` (evaluation only; MSSEG-2016's animaSegPerfAnalyzer, Commowick et al. 2018): a lesion of one
  mask is detected when the other mask's components cover more than ``MSSEG_MIN_COVERED`` of it and those
  covering it most (largest overlap first, until they give ``MSSEG_COVERAGE_CHECKED`` of the covered voxels)
  each lie at most ``MSSEG_MAX_OUTSIDE`` outside the first mask's lesions. Applied to GT lesions (TP / FN)
  and to predicted components (TP / FP) alike.

``min_size`` is post-processing of the prediction: predicted components with fewer voxels are dropped (the
study dropped components of <= 5 voxels, i.e. ``min_size=6``). Every ground-truth lesion counts, whatever
its size.
"""
from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np

GROUPS = ("TP", "FP", "FN")
UNKNOWN_GROUP = "unknown"
CONNECTIVITIES = (6, 18, 26)
MATCHING_RULES = ("any", "iou")
MSSEG_RULE = "msseg"
# animaSegPerfAnalyzer's detection thresholds, its command's defaults as MSSEG-2016 used them (-x, -y, -z)
MSSEG_MIN_COVERED = 0.10
MSSEG_MAX_OUTSIDE = 0.70
MSSEG_COVERAGE_CHECKED = 0.65


def label_components(binary: np.ndarray, connectivity: int = 18, min_size: int = 1) -> np.ndarray:
    """Connected components of a 3D binary mask as int32 ids 1..n (0 = background).

    Components with fewer than `min_size` voxels are removed and the remaining ids are made consecutive,
    in the order cc3d numbers them (raster order of each component's first voxel).
    """
    if binary.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {binary.shape}")
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    labels = cc3d.connected_components(np.asarray(binary, dtype=bool), connectivity=connectivity,
                                       out_dtype=np.uint32).astype(np.int32)
    if min_size > 1:
        sizes = np.bincount(labels.ravel())
        kept = sizes >= min_size
        kept[0] = False
        new_ids = (np.cumsum(kept) * kept).astype(np.int32)
        labels = new_ids[labels]
    return labels


@dataclass(frozen=True)
class Matching:
    """Component ids (sorted) of predicted TP / FP instances and of matched / missed ground-truth lesions."""
    tp_pred: list[int]
    fp_pred: list[int]
    tp_gt: list[int]
    fn_gt: list[int]


def match_components(pred_labels: np.ndarray, gt_labels: np.ndarray, rule: str = "any",
                     iou_threshold: float = 0.25) -> Matching:
    """Match predicted components to ground-truth lesions (label images from `label_components`)."""
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground truth shape {gt_labels.shape}")
    if rule not in (*MATCHING_RULES, MSSEG_RULE):
        raise ValueError(f"matching rule must be one of {(*MATCHING_RULES, MSSEG_RULE)}, got {rule!r}")
    if rule == "iou" and not 0 < iou_threshold <= 1:
        raise ValueError(f"IoU threshold must be in (0, 1], got {iou_threshold}")
    n_pred, n_gt = int(pred_labels.max(initial=0)), int(gt_labels.max(initial=0))
    if rule == MSSEG_RULE:
        overlap = np.bincount(gt_labels.ravel().astype(np.int64) * (n_pred + 1) + pred_labels.ravel(),
                              minlength=(n_gt + 1) * (n_pred + 1)).reshape(n_gt + 1, n_pred + 1)
        tp_gt, tp_pred = _msseg_detected(overlap), _msseg_detected(overlap.T)
        return Matching(tp_pred, [i for i in range(1, n_pred + 1) if i not in tp_pred],
                        tp_gt, [i for i in range(1, n_gt + 1) if i not in tp_gt])
    both = (pred_labels > 0) & (gt_labels > 0)
    pair_codes, intersections = np.unique(pred_labels[both].astype(np.int64) * (n_gt + 1) + gt_labels[both],
                                          return_counts=True)
    pair_pred, pair_gt = np.divmod(pair_codes, n_gt + 1)
    if rule == "iou":
        pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
        gt_sizes = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)
        iou = intersections / (pred_sizes[pair_pred] + gt_sizes[pair_gt] - intersections)
        matched = iou >= iou_threshold
        pair_pred, pair_gt = pair_pred[matched], pair_gt[matched]
    matched_pred, matched_gt = set(pair_pred.tolist()), set(pair_gt.tolist())
    return Matching(
        tp_pred=sorted(matched_pred),
        fp_pred=[i for i in range(1, n_pred + 1) if i not in matched_pred],
        tp_gt=sorted(matched_gt),
        fn_gt=[i for i in range(1, n_gt + 1) if i not in matched_gt],
    )


def _msseg_detected(overlap: np.ndarray) -> list[int]:
    """Lesions (rows 1..) detected by the other mask's components (columns 1..) under the MSSEG rule.

    `overlap[i, j]` counts voxels of lesion i and component j; row and column 0 are background. Follows
    animaSegPerfAnalyzer step by step, including its limit of as many checked components as there are rows.
    """
    component_sizes = overlap.sum(axis=0)
    detected = []
    for lesion in range(1, overlap.shape[0]):
        covering = overlap[lesion, 1:]
        covered = int(covering.sum())
        if covered / overlap[lesion].sum() <= MSSEG_MIN_COVERED:
            continue
        checked_share, outside = 0.0, False
        for component in (np.argsort(-covering, kind="stable") + 1)[:overlap.shape[0]]:
            if checked_share >= MSSEG_COVERAGE_CHECKED:
                break
            outside = overlap[0, component] / component_sizes[component] > MSSEG_MAX_OUTSIDE
            if outside:
                break
            checked_share += overlap[lesion, component] / covered
        if not outside:
            detected.append(lesion)
    return detected


@dataclass(frozen=True)
class LesionInstance:
    """One lesion to explain: a predicted component (TP / FP / unknown) or a missed GT lesion (FN)."""
    instance_id: int
    group: str
    mask: np.ndarray


def case_instances(pred_binary: np.ndarray, gt_binary: np.ndarray | None = None, connectivity: int = 18,
                   min_size: int = 1, rule: str = "any", iou_threshold: float = 0.25) -> list[LesionInstance]:
    """All instances of one case: predicted components first (ids 1..P), then FN ground-truth lesions (P+1..).

    Without ground truth every predicted component has group "unknown".
    """
    pred_labels = label_components(pred_binary, connectivity, min_size)
    n_pred = int(pred_labels.max(initial=0))
    if gt_binary is None:
        return [LesionInstance(i, UNKNOWN_GROUP, pred_labels == i) for i in range(1, n_pred + 1)]
    gt_labels = label_components(gt_binary, connectivity)
    matching = match_components(pred_labels, gt_labels, rule, iou_threshold)
    tp = set(matching.tp_pred)
    instances = [LesionInstance(i, "TP" if i in tp else "FP", pred_labels == i) for i in range(1, n_pred + 1)]
    instances += [LesionInstance(n_pred + k, "FN", gt_labels == gt_id)
                  for k, gt_id in enumerate(matching.fn_gt, start=1)]
    return instances
