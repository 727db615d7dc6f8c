"""Short-schedule trainers for CPU demos and tests: a few small epochs and a cheap end-of-training validation.

`NNXAI_EPOCHS` and `NNXAI_ITERATIONS` (training iterations per epoch) override the defaults, so tests and
the demo choose how long to train without new classes.

nnU-Net's SGD (momentum 0.99, lr 0.01) is tuned for 250,000 iterations. On the 2 mm phantom cohort with
32^3 patches it first segmented lesions after about 900 iterations (pseudo Dice 0.78 after 1,280); AdamW
(lr 3e-3, nnU-Net's poly decay) with every patch centred on a lesion reached 0.64 after 200 and 0.92 after
800 iterations. The short schedules use the latter; the full trainers keep nnU-Net's recipe.
"""
from __future__ import annotations

import os
from unittest import mock

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from trainers.nnUNetTrainerWML import nnUNetTrainerWML

EPOCHS_VARIABLE = "NNXAI_EPOCHS"
ITERATIONS_VARIABLE = "NNXAI_ITERATIONS"
WORKERS_VARIABLE = "nnUNet_def_n_proc"
DEFAULT_EPOCHS = 5
DEFAULT_ITERATIONS = 20
SHORT_LEARNING_RATE = 3e-3


def positive_int_from_environment(name: str, default: int) -> int:
    """The positive integer in environment variable `name`, or `default` when it is unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {text!r}")
    return int(text)


def cpu_training_threads() -> int:
    """Torch threads for training on the CPU: the cores nnU-Net's augmentation workers leave free, at least one.

    nnUNetv2_train gives torch one thread per core; on 2 cores beside 2 augmentation workers a demo epoch took
    37-41 s that way and 7.6-8.4 s with one thread (torch's threads spin while the workers hold the cores).
    """
    return max(1, (os.cpu_count() or 1) - get_allowed_n_proc_DA())


class ShortSchedule:
    """Mixin for an nnU-Net trainer: short schedule that learns fast (AdamW, lesion-centred patches), a checkpoint
    every epoch, final validation without mirroring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = positive_int_from_environment(EPOCHS_VARIABLE, DEFAULT_EPOCHS)
        self.num_iterations_per_epoch = positive_int_from_environment(ITERATIONS_VARIABLE, DEFAULT_ITERATIONS)
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 5)
        self.save_every = 1
        self.initial_lr = SHORT_LEARNING_RATE
        self.oversample_foreground_percent = 1.0

    def on_train_start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_training_threads())
        super().on_train_start()

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation, made cheap for a small CPU.

        No mirroring (1 instead of 8 forward passes per tile); only the validation skips it: training
        augmentation and the mirroring axes stored in the checkpoints (used by nnUNetv2_predict) stay
        nnU-Net's. Unless `nnUNet_def_n_proc` is set, export and metrics use half the CPU cores instead of
        nnU-Net's 8 spawned workers (each imports torch: minutes on 2 busy cores, for a few cases).
        """
        mirroring_axes = self.inference_allowed_mirroring_axes
        self.inference_allowed_mirroring_axes = None
        workers = int(os.environ.get(WORKERS_VARIABLE, 0)) or max(1, (os.cpu_count() or 2) // 2)
        try:
            with mock.patch.object(nnunet_trainer_module, "default_num_processes", workers):
                super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = mirroring_axes


class nnUNetTrainerShort(ShortSchedule, nnUNetTrainer):
    """nnU-Net's default loss (Dice + cross-entropy) on the short schedule: the baseline for comparisons."""


class nnUNetTrainerWMLShort(ShortSchedule, nnUNetTrainerWML):
    """The study's nDSC + focal loss on the short schedule."""
