"""nnxai's nnU-Net trainers: found by nnU-Net, the study's loss wrapped for deep supervision, short schedules."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fake_nnunet import plan_fake_dataset
from nnxai.nnunet.plans import write_small_plans
from trainers.nnUNetTrainerShort import cpu_training_threads, nnUNetTrainerShort, nnUNetTrainerWMLShort
from trainers.nnUNetTrainerWML import nnUNetTrainerWML
from trainers.wml_loss import NDSCFocalLoss

DATASET_ID = 952
TRAINER_NAMES = ("nnUNetTrainerWML", "nnUNetTrainerWMLShort", "nnUNetTrainerShort")
LESION_LABELS = {"background": 0, "lesion": 1}


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """Temporary nnU-Net folders in the environment, no external trainers, no nnxai schedule overrides."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    for name in ("nnUNet_extTrainer", "NNXAI_EPOCHS", "NNXAI_ITERATIONS", "nnUNet_def_n_proc"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def plans(nnunet_folders):
    return json.loads(plan_fake_dataset(DATASET_ID).read_text())


def venv_command(name: str) -> str:
    """A console script installed next to this Python (nnUNetv2_train, nnxai)."""
    return str(Path(sys.executable).with_name(name))


def make_trainer(trainer_class, plans: dict, labels: dict | None = None, **dataset_json_extra):
    dataset_json = {"channel_names": {"0": "FLAIR", "1": "T1"}, "labels": labels or LESION_LABELS,
                    "numTraining": 2, "file_ending": ".nii.gz", **dataset_json_extra}
    return trainer_class({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def test_nnunet_finds_the_trainers_once_registered(tmp_path):
    script = textwrap.dedent(f"""
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from nnxai.nnunet.environment import register_trainers
        try:
            recursive_find_trainer_class_by_name("nnUNetTrainerWML")
            print("RESULT found without registration")
        except RuntimeError:
            print("RESULT not found without registration")
        register_trainers()
        for name in {TRAINER_NAMES!r}:
            print("RESULT found", recursive_find_trainer_class_by_name(name).__name__)
    """)
    environment = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    results = [line.removeprefix("RESULT ") for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == ["not found without registration"] + [f"found {name}" for name in TRAINER_NAMES]


def test_wml_loss_is_wrapped_for_deep_supervision_like_nnunets_own(plans):
    loss = make_trainer(nnUNetTrainerWML, plans)._build_loss()
    reference = make_trainer(nnUNetTrainer, plans)._build_loss()
    assert isinstance(loss, DeepSupervisionWrapper) and isinstance(loss.loss, NDSCFocalLoss)
    assert loss.weight_factors == reference.weight_factors
    assert loss.loss.ignore_label is None
    assert loss.loss.ndsc.batch_dice is plans["configurations"]["3d_fullres"]["batch_dice"]
    assert (loss.loss.weight_ndsc, loss.loss.weight_focal, loss.loss.ndsc.r, loss.loss.focal.gamma) == \
        (0.5, 1.0, 0.001, 2.0)
    # three outputs (full, 1/2, 1/4 resolution): weights 1, 1/2, 0 (nnU-Net drops the lowest), normalized
    assert np.allclose(loss.weight_factors, [2 / 3, 1 / 3, 0])
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randn(1, 2, s, s, s, generator=generator) for s in (8, 4, 2)]
    targets = [torch.randint(0, 2, (1, 1, s, s, s), generator=generator).float() for s in (8, 4, 2)]
    expected = 2 / 3 * loss.loss(outputs[0], targets[0]) + 1 / 3 * loss.loss(outputs[1], targets[1])
    assert loss(outputs, targets).item() == pytest.approx(expected.item())


def test_wml_loss_uses_the_datasets_ignore_label(plans):
    loss = make_trainer(nnUNetTrainerWML, plans, {**LESION_LABELS, "ignore": 2})._build_loss()
    assert loss.loss.ignore_label == 2


def test_wml_trainer_refuses_region_training(plans):
    trainer = make_trainer(nnUNetTrainerWML, plans, {"background": 0, "lesion": [1, 2], "core": [2]},
                           regions_class_order=[1, 2])
    assert trainer.label_manager.has_regions
    with pytest.raises(RuntimeError, match="regions"):
        trainer._build_loss()


def test_short_schedules_read_the_environment(plans, monkeypatch):
    trainer = make_trainer(nnUNetTrainerWMLShort, plans)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
            trainer.save_every) == (5, 20, 4, 1)
    monkeypatch.setenv("NNXAI_EPOCHS", "3")
    monkeypatch.setenv("NNXAI_ITERATIONS", "7")
    trainer = make_trainer(nnUNetTrainerShort, plans)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (3, 7, 1)
    assert isinstance(trainer._build_loss().loss, DC_and_CE_loss), "the baseline keeps nnU-Net's loss"
    monkeypatch.setenv("NNXAI_EPOCHS", "0")
    with pytest.raises(ValueError, match="NNXAI_EPOCHS must be a positive integer, got '0'"):
        make_trainer(nnUNetTrainerWMLShort, plans)


@pytest.mark.parametrize("cores, workers, threads", [(2, 2, 1), (16, 2, 14), (4, 12, 1)])
def test_short_training_on_the_cpu_leaves_the_augmentation_workers_their_cores(plans, monkeypatch, cores, workers,
                                                                              threads):
    monkeypatch.setenv("nnUNet_n_proc_DA", str(workers))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert cpu_training_threads() == threads
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        make_trainer(nnUNetTrainerWMLShort, plans).on_train_start()
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_short_schedules_learn_fast_and_full_trainers_keep_nnunets_recipe(plans):
    def optimizer_of(trainer):
        trainer.network = torch.nn.Conv3d(2, 2, 1)
        return trainer.configure_optimizers()

    for trainer_class in (nnUNetTrainerWMLShort, nnUNetTrainerShort):
        trainer = make_trainer(trainer_class, plans)
        optimizer, scheduler = optimizer_of(trainer)
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["lr"] == 3e-3
        assert scheduler.max_steps == trainer.num_epochs and trainer.oversample_foreground_percent == 1.0
    full = make_trainer(nnUNetTrainerWML, plans)
    optimizer, _ = optimizer_of(full)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 1e-2
    assert full.oversample_foreground_percent == 0.33


@pytest.mark.parametrize("workers_variable, expected_workers", [(None, max(1, os.cpu_count() // 2)), ("3", 3)])
def test_short_validation_skips_mirroring_and_spawns_few_workers(plans, monkeypatch, workers_variable,
                                                                 expected_workers):
    if workers_variable is not None:
        monkeypatch.setenv("nnUNet_def_n_proc", workers_variable)
    seen = {}

    def record_validation(trainer, save_probabilities=False):
        seen.update(axes=trainer.inference_allowed_mirroring_axes,
                    workers=nnunet_trainer_module.default_num_processes)

    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", record_validation)
    trainer = make_trainer(nnUNetTrainerWMLShort, plans)
    trainer.inference_allowed_mirroring_axes = (0, 1, 2)
    workers_before = nnunet_trainer_module.default_num_processes
    trainer.perform_actual_validation()
    assert seen == {"axes": None, "workers": expected_workers}
    assert trainer.inference_allowed_mirroring_axes == (0, 1, 2), "checkpoints keep mirroring for inference"
    assert nnunet_trainer_module.default_num_processes == workers_before


@pytest.mark.slow
def test_short_wml_training_on_cpu_writes_final_checkpoint(nnunet_folders):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    plans_file = plan_fake_dataset(DATASET_ID, n_cases=4)
    preprocess_dataset(DATASET_ID, configurations=["3d_fullres"], num_processes=[1], show_progress_bar=False)
    split = {"train": ["case_000", "case_001", "case_002"], "val": ["case_003"]}
    plans_file.with_name("splits_final.json").write_text(json.dumps([split]))
    write_small_plans(DATASET_ID)
    trainers_folder = subprocess.run([venv_command("nnxai"), "trainers-path"], capture_output=True, text=True,
                                     check=True).stdout.strip()
    environment = {**os.environ, "nnUNet_extTrainer": trainers_folder, "NNXAI_EPOCHS": "2", "NNXAI_ITERATIONS": "2"}
    result = subprocess.run([venv_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0",
                             "-tr", "nnUNetTrainerWMLShort", "-p", "nnxaiCPUPlans", "-device", "cpu"],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = nnunet_folders / "nnUNet_results" / "Dataset952_Fake" / "nnUNetTrainerWMLShort__nnxaiCPUPlans__3d_fullres" \
        / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerWMLShort"
    assert checkpoint["current_epoch"] == 2
    assert tuple(checkpoint["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    assert (fold / "validation" / "summary.json").is_file()
