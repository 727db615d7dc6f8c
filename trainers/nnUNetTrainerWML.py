"""nnU-Net v2 trainer with the study's lesion loss (SPEC section 1).

0.5 x soft normalized Dice (r = 0.001) + 1.0 x focal loss (gamma = 2, no alpha), see trainers/wml_loss.py.
"""
from __future__ import annotations

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from trainers.wml_loss import NDSCFocalLoss


class nnUNetTrainerWML(nnUNetTrainer):
    """nnU-Net's default recipe (schedule, augmentation, deep supervision) with the nDSC + focal loss."""

    def _build_loss(self) -> nn.Module:
        if self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__} needs label-based (softmax) training; this dataset.json "
                               "defines regions")
        lesion_loss = NDSCFocalLoss(batch_dice=self.configuration_manager.batch_dice,
                                    ignore_label=self.label_manager.ignore_label)
        nnunet_loss = super()._build_loss()
        if isinstance(nnunet_loss, DeepSupervisionWrapper):
            # keep nnU-Net's own deep-supervision wrapper and weights, swap only the per-output loss
            nnunet_loss.loss = lesion_loss
            return nnunet_loss
        return lesion_loss
