"""The study's training loss for white-matter lesions (SPEC section 1): 0.5 x soft normalized Dice + 1.0 x focal.

Both terms take nnU-Net's conventions: `logits` (B, C, *spatial) straight from the network, `target`
(B, 1, *spatial) holding integer labels, and an optional boolean `loss_mask` (B, 1, *spatial) that is False
on voxels carrying nnU-Net's ignore label (those voxels then count for nothing, not even in N).
"""
from __future__ import annotations

import math

import torch
from torch import nn

NDSC_REFERENCE_LESION_FRACTION = 0.001
FOCAL_GAMMA = 2.0
NDSC_WEIGHT = 0.5
FOCAL_WEIGHT = 1.0


class SoftNormalizedDiceLoss(nn.Module):
    """1 - soft nDSC, averaged over foreground classes (and over samples unless `batch_dice`).

    nDSC = 2TP / (2TP + k FP + FN) with k = (1 - r)|GT| / (r (N - |GT|)) (SPEC section 6): false positives are
    rescaled as if the lesion load were the reference fraction r, so the score does not depend on lesion load.
    TP, FP, FN are soft counts from the softmax probabilities, hence differentiable. Where the ground truth
    is empty, k = 0 and the term is 0 whatever the prediction: nDSC is undefined there and false positives in
    lesion-free patches are left to the focal term.
    """

    def __init__(self, r: float = NDSC_REFERENCE_LESION_FRACTION, batch_dice: bool = False, smooth: float = 1e-5):
        super().__init__()
        if not 0 < r < 1:
            raise ValueError(f"reference lesion fraction r must lie in (0, 1), got {r}")
        self.r = r
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        foreground_probs = torch.softmax(logits, dim=1)[:, 1:]
        classes = torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
        truth = (target.long() == classes).to(foreground_probs.dtype)
        axes = (0, *range(2, logits.ndim)) if self.batch_dice else tuple(range(2, logits.ndim))
        if loss_mask is None:
            voxel_count = math.prod(truth.shape[axis] for axis in axes)
        else:
            voxels = loss_mask.to(foreground_probs.dtype)
            foreground_probs = foreground_probs * voxels
            truth = truth * voxels
            voxel_count = voxels.sum(axes)
        tp = (foreground_probs * truth).sum(axes)
        fp = foreground_probs.sum(axes) - tp
        fn = truth.sum(axes) - tp
        lesion = truth.sum(axes)
        background = (voxel_count - lesion).clamp(min=1.0)
        k = (1 - self.r) * lesion / (self.r * background)
        ndsc = (2 * tp + self.smooth) / (2 * tp + k * fp + fn + self.smooth)
        return 1 - ndsc.mean()


class FocalLoss(nn.Module):
    """Softmax focal loss -(1 - p_t)^gamma log p_t, averaged over (unmasked) voxels, no class weighting (alpha = 1)."""

    def __init__(self, gamma: float = FOCAL_GAMMA):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        log_p_true = torch.log_softmax(logits, dim=1).gather(1, target.long())
        focal = -((1 - log_p_true.exp()) ** self.gamma) * log_p_true
        if loss_mask is None:
            return focal.mean()
        weights = loss_mask.to(focal.dtype)
        return (focal * weights).sum() / weights.sum().clamp(min=1.0)


class NDSCFocalLoss(nn.Module):
    """weight_ndsc x SoftNormalizedDiceLoss + weight_focal x FocalLoss, honouring nnU-Net's ignore label."""

    def __init__(self, weight_ndsc: float = NDSC_WEIGHT, weight_focal: float = FOCAL_WEIGHT,
                 r: float = NDSC_REFERENCE_LESION_FRACTION, gamma: float = FOCAL_GAMMA, batch_dice: bool = False,
                 ignore_label: int | None = None):
        super().__init__()
        self.weight_ndsc = weight_ndsc
        self.weight_focal = weight_focal
        self.ignore_label = ignore_label
        self.ndsc = SoftNormalizedDiceLoss(r=r, batch_dice=batch_dice)
        self.focal = FocalLoss(gamma=gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ignore_label is None:
            loss_mask = None
        else:
            loss_mask = target != self.ignore_label
            target = torch.where(loss_mask, target, 0)
        return (self.weight_ndsc * self.ndsc(logits, target, loss_mask)
                + self.weight_focal * self.focal(logits, target, loss_mask))
