"""Safe checkpoint loading: real nnU-Net checkpoints load, code hidden in a checkpoint never runs."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nnxai.nnunet.checkpoint import CheckpointError, load_checkpoint

PATCH = (16, 16, 16)


def tiny_plans(dataset_name: str) -> dict:
    """nnU-Net plans for a 3-stage PlainConvUNet with 4-8 features on a 16^3 patch."""
    resampling = {"order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(PATCH),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": list(PATCH),
            "median_image_size_in_voxels": list(PATCH),
            "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 3, "features_per_stage": [4, 8, 8],
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                    "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3.0, "mean": 0.0, "median": 0.0, "min": -3.0,
            "percentile_00_5": -2.5, "percentile_99_5": 2.5, "std": 1.0}},
    }


def random_batch(generator: torch.Generator) -> dict:
    """A training batch as nnU-Net's loader delivers it: data and deep-supervision targets."""
    data = torch.randn(2, 1, *PATCH, generator=generator)
    target = (torch.rand(2, 1, *PATCH, generator=generator) > 0.7).float()
    return {"data": data, "target": [target, torch.nn.functional.max_pool3d(target, 2)]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    """A checkpoint written by nnU-Net's own nnUNetTrainer.save_checkpoint after one real epoch.

    The epoch runs the trainer's own hooks (train and validation steps on random batches, the
    logger's loss/Dice/EMA bookkeeping, best-checkpoint saving); only the data loaders are left out.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    root = tmp_path_factory.mktemp("nnunet")
    dataset_name = "Dataset999_Tiny"
    with pytest.MonkeyPatch.context() as patch:
        for folder in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            patch.setenv(folder, str(root / folder))
        preprocessed = root / "nnUNet_preprocessed" / dataset_name / "nnUNetPlans_3d_fullres"
        preprocessed.mkdir(parents=True)
        rng = np.random.default_rng(0)
        nnUNetDatasetNumpy.save_case(rng.normal(size=(1, *PATCH)).astype(np.float32),
                                     (rng.random((1, *PATCH)) > 0.7).astype(np.int16),
                                     {"spacing": [1.0, 1.0, 1.0]}, str(preprocessed / "case_000"))
        plans = tiny_plans(dataset_name) | {"continue_training": False}
        dataset_json = {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1},
                        "numTraining": 1, "file_ending": ".nii.gz"}
        trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        trainer.grad_scaler = torch.amp.GradScaler("cpu")  # nnU-Net uses one on GPUs: its state is saved too
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        generator = torch.Generator().manual_seed(0)
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([trainer.train_step(random_batch(generator))])
        trainer.on_validation_epoch_start()
        with torch.no_grad():
            trainer.on_validation_epoch_end([trainer.validation_step(random_batch(generator))])
        trainer.on_epoch_end()
        trainer.current_epoch -= 1  # what on_train_end does before writing the final checkpoint
        path = Path(trainer.output_folder) / "checkpoint_final.pth"
        trainer.save_checkpoint(str(path))
    return path, trainer


def test_real_checkpoint_loads_without_trust(trained):
    path, trainer = trained
    checkpoint = load_checkpoint(path)
    expected = trainer.network.state_dict()
    assert list(checkpoint["network_weights"]) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(checkpoint["network_weights"][name], tensor), name
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert checkpoint["init_args"]["device"] == torch.device("cpu")
    assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert checkpoint["current_epoch"] == 1
    assert checkpoint["grad_scaler_state"] == trainer.grad_scaler.state_dict() != {}
    momentum = checkpoint["optimizer_state"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, trainer.optimizer.state_dict()["state"][0]["momentum_buffer"])
    logged = trainer.logger.get_checkpoint()
    assert isinstance(checkpoint["_best_ema"], np.floating)
    assert checkpoint["_best_ema"] == trainer._best_ema
    assert checkpoint["logging"]["train_losses"] == logged["train_losses"]
    assert checkpoint["logging"]["dice_per_class_or_region"] == logged["dice_per_class_or_region"]


def test_real_checkpoint_needs_the_numpy_allow_list(trained):
    """Without nnxai's allow-list torch refuses nnU-Net's numpy scalars: the list is what makes it load."""
    path, _ = trained
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, weights_only=True)


def _rewrite_pickle(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes in the pickle inside a torch.save zip archive (e.g. to rename a global)."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle_name = next(name for name in records if name.endswith("/data.pkl"))
    assert old in records[pickle_name]
    records[pickle_name] = records[pickle_name].replace(old, new)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)


def minimal_checkpoint(**extra) -> dict:
    return {"network_weights": {"conv.weight": torch.arange(4.0)}, "init_args": {"configuration": "3d_fullres"},
            "trainer_name": "nnUNetTrainer", **extra}


def test_checkpoint_written_under_numpy_1_loads(tmp_path):
    """numpy 1 pickled scalars as numpy.core.multiarray.scalar and promoted the EMA to float64."""
    path = tmp_path / "checkpoint_final.pth"
    torch.save(minimal_checkpoint(_best_ema=np.float64(0.625), logging={"train_losses": [np.float32(-0.5)]}), path)
    _rewrite_pickle(path, b"numpy._core.multiarray\nscalar\n", b"numpy.core.multiarray\nscalar\n")
    checkpoint = load_checkpoint(path)
    assert checkpoint["_best_ema"] == 0.625 and checkpoint["_best_ema"].dtype == np.float64
    assert checkpoint["logging"]["train_losses"][0].dtype == np.float32
    assert torch.equal(checkpoint["network_weights"]["conv.weight"], torch.arange(4.0))


class Payload:
    """Unpickles as a call to `function(*args)`: how a malicious checkpoint runs code."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "posix.system": Payload(os.system, f"touch '{marker}'"),
    }


@pytest.mark.parametrize("global_name", ["builtins.exec", "posix.system"])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, global_name):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint_final.pth"
    torch.save(minimal_checkpoint(logging=payloads(marker)[global_name]), path)

    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = refused.value.message
    assert "\n" not in message
    assert str(path) in message and global_name in message and "--trust-model" in message
    assert not marker.exists()

    load_checkpoint(path, trust=True)  # the same file, trusted: the payload is real and runs
    assert marker.exists()


def test_raw_pickle_payload_is_refused(tmp_path):
    """A bare pickle (torch's legacy, non-zip format) is read by the same restricted unpickler."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes(pickle.dumps(payloads(marker)["builtins.exec"], protocol=2))
    with pytest.raises(CheckpointError, match="refusing to unpickle .*exec"):
        load_checkpoint(path)
    assert not marker.exists()


def test_type_outside_the_allow_list_is_named(tmp_path):
    """Harmless but unlisted types are refused too, naming the class torch would have had to build."""
    path = tmp_path / "checkpoint_final.pth"
    torch.save(minimal_checkpoint(current_epoch=np.int64(3)), path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle numpy\.dtypes\.Int64DType"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True)["current_epoch"] == 3


@pytest.mark.parametrize(("content", "problem"), [
    ({"state_dict": {"w": torch.zeros(1)}}, "missing network_weights, init_args, trainer_name"),
    (torch.zeros(3), "holds a Tensor, not a dict"),
    (minimal_checkpoint(network_weights=[torch.zeros(1)]), "network_weights is not a state dict of tensors"),
    (minimal_checkpoint(trainer_name=7), "trainer_name is not a string"),
    (minimal_checkpoint(init_args={"fold": 0}), "init_args lacks the configuration name"),
])
def test_not_an_nnunet_checkpoint(tmp_path, content, problem):
    path = tmp_path / "model.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert error.value.message == f"{path}: not an nnU-Net checkpoint ({problem})"


@pytest.mark.parametrize(("content", "problem"), [
    (b"hello, not a checkpoint\n", "not a readable PyTorch checkpoint"),
    (b"", "not a readable PyTorch checkpoint"),
    (None, "no such checkpoint file"),
])
def test_unreadable_file(tmp_path, content, problem):
    path = tmp_path / "checkpoint_final.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as error:
        load_checkpoint(path, trust=True)
    assert error.value.message.startswith(f"{path}: ") and "\n" not in error.value.message


def test_truncated_checkpoint(tmp_path, trained):
    path = tmp_path / "checkpoint_final.pth"
    complete = trained[0].read_bytes()
    path.write_bytes(complete[: len(complete) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_refusal_is_a_one_line_cli_error(tmp_path):
    """In a command of nnxai's command line a refusal prints `Error: <message>` on one line and exits 1."""
    import click
    from click.testing import CliRunner

    from nnxai.cli import LazyGroup

    @click.group(cls=LazyGroup)
    def cli() -> None:
        """nnxai's command group, with one command that reads a checkpoint."""

    @cli.command()
    @click.argument("checkpoint")
    @click.option("--trust-checkpoint", is_flag=True)
    def show(checkpoint: str, trust_checkpoint: bool) -> None:
        click.echo(load_checkpoint(checkpoint, trust=trust_checkpoint)["trainer_name"])

    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint_final.pth"
    torch.save(minimal_checkpoint(logging=payloads(marker)["builtins.exec"]), path)
    refused = CliRunner().invoke(cli, ["show", str(path)])
    assert refused.exit_code == 1
    assert refused.output.startswith(f"Error: {path}: refusing to unpickle builtins.exec")
    assert refused.output.count("\n") == 1 and not marker.exists()
    trusted = CliRunner().invoke(cli, ["show", str(path), "--trust-checkpoint"])
    assert (trusted.exit_code, trusted.output, marker.exists()) == (0, "nnUNetTrainer\n", True)
