"""nnU-Net v2 models as users have them: ResEnc networks, fold ensembles, fold_all, compiled checkpoints,
several labels; and the configurations nnxai refuses (2D, cascade, regions) with a one-line reason."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnxai.attribution.gradcampp import default_layer, valid_layers
from nnxai.attribution.smoothgrad import instance_smoothgrad
from nnxai.nnunet.model import LoadedModel, ModelError, load_model
from nnxai.nnunet.sliding_window import SlidingWindow
from tests.conftest import tiny_unet
from tests.fake_model import write_model_folder

RESENC = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                    "n_blocks_per_stage": [1, 2], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def rewrite(folder: Path, plans_edit=None, dataset_edit=None, checkpoint_edit=None) -> Path:
    """Edit a model folder's plans.json, dataset.json and every checkpoint in place."""
    for name, edit in (("plans.json", plans_edit), ("dataset.json", dataset_edit)):
        if edit:
            content = json.loads((folder / name).read_text())
            edit(content)
            (folder / name).write_text(json.dumps(content))
    if checkpoint_edit:
        for path in folder.glob("fold_*/checkpoint_final.pth"):
            checkpoint = torch.load(path, weights_only=False)
            checkpoint_edit(checkpoint)
            torch.save(checkpoint, path)
    return folder


def resenc_network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(RESENC["arch_kwargs"], conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU)
    return ResidualEncoderUNet(input_channels=2, num_classes=2, deep_supervision=False, **kwargs).eval()


@pytest.fixture
def resenc_model(tmp_path) -> LoadedModel:
    """A ResEnc model folder as nnU-Net's ResEnc planner lays it out (nnUNetResEncUNetMPlans), random weights."""
    folder = write_model_folder(tmp_path / "resenc")

    def resenc_plans(plans):
        plans["plans_name"] = "nnUNetResEncUNetMPlans"
        plans["configurations"]["3d_fullres"]["architecture"] = copy.deepcopy(RESENC)

    def resenc_weights(checkpoint):
        checkpoint["network_weights"] = resenc_network(0).state_dict()
    return load_model(rewrite(folder, resenc_plans, checkpoint_edit=resenc_weights))


def test_resenc_single_tile_zero_noise_map_is_the_networks_gradient(resenc_model):
    network = resenc_model.networks[0]
    assert type(network).__name__ == "ResidualEncoderUNet"
    data = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = np.zeros((16, 16, 16), bool)
    mask[5:9, 6:10, 4:8] = True
    window = resenc_model.sliding_window(use_mirroring=False)
    assert len(window.layout(mask.shape).tiles) == 1
    ours = instance_smoothgrad(window, data, {1: mask}, samples=1, noise=0.0)[1]
    x = data.clone().requires_grad_(True)
    gaussian_weight = window.layout(mask.shape).tile_weight(window.layout(mask.shape).tiles[0])
    (expected,) = torch.autograd.grad((network(x[None])[0, 1] * gaussian_weight * torch.as_tensor(mask)).sum(), x)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-7)
    assert np.abs(ours).max() > 0


def test_resenc_layers_and_default_gradcampp_layer(resenc_model):
    network = resenc_model.networks[0]
    names = [info.name for info in valid_layers(network, (16, 16, 16), 2)]
    assert default_layer(network) == "decoder.stages.0" and "decoder.stages.0" in names
    assert {"encoder.stages.0", "encoder.stages.1"} <= set(names)


def test_fold_ensemble_map_is_the_mean_of_the_folds(tmp_path):
    folder = write_model_folder(tmp_path / "model", folds=(0, 1))
    ensemble = load_model(folder, ["0", "1"])
    data = torch.randn(2, 20, 18, 16, generator=torch.Generator().manual_seed(2))
    mask = np.zeros((20, 18, 16), bool)
    mask[4:8, 5:9, 6:9] = True
    maps = [instance_smoothgrad(model.sliding_window(use_mirroring=False), data, {1: mask}, samples=1, noise=0.0)[1]
            for model in (ensemble, load_model(folder, ["0"]), load_model(folder, ["1"]))]
    np.testing.assert_allclose(maps[0], (maps[1] + maps[2]) / 2, rtol=1e-5, atol=1e-8)
    assert not np.allclose(maps[1], maps[2])


def test_fold_all_and_checkpoint_best(tmp_path):
    folder = write_model_folder(tmp_path / "model", folds=(0,))
    (folder / "fold_0").rename(folder / "fold_all")
    with pytest.raises(ModelError, match="no fold_\\*/checkpoint_final.pth found"):
        load_model(folder)  # as nnU-Net: fold_all is used only when asked for
    assert load_model(folder, ["all"]).folds == ["all"]
    (folder / "fold_all" / "checkpoint_final.pth").rename(folder / "fold_all" / "checkpoint_best.pth")
    assert load_model(folder, ["all"], "checkpoint_best.pth").checkpoint_name == "checkpoint_best.pth"


def test_checkpoint_of_a_compiled_network_loads_the_same_weights(tmp_path):
    plain = load_model(write_model_folder(tmp_path / "plain"))

    def compiled_keys(checkpoint):
        checkpoint["network_weights"] = {f"_orig_mod.{k}": v for k, v in checkpoint["network_weights"].items()}
    compiled = load_model(rewrite(write_model_folder(tmp_path / "compiled"), checkpoint_edit=compiled_keys))
    for (name, a), b in zip(plain.networks[0].state_dict().items(), compiled.networks[0].state_dict().values()):
        assert torch.equal(a, b), name


def second_stage(plans):
    configuration = plans["configurations"]["3d_fullres"]
    plans["configurations"]["3d_cascade_fullres"] = {**copy.deepcopy(configuration), "previous_stage": "3d_lowres"}


@pytest.mark.parametrize("plans_edit,dataset_edit,configuration,message", [
    (lambda p: p["configurations"].update({"2d": {**copy.deepcopy(p["configurations"]["3d_fullres"]),
                                                  "patch_size": [16, 16]}}),
     None, "2d", "configuration '2d' is 2D; nnxai explains 3D configurations"),
    (second_stage, None, "3d_cascade_fullres", "is a cascade stage"),
    (None, lambda d: d.update(labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2]),
     "3d_fullres", "region-based labels (regions_class_order) are not supported"),
])
def test_unsupported_configurations_are_refused_in_one_line(tmp_path, plans_edit, dataset_edit, configuration,
                                                            message):
    folder = rewrite(write_model_folder(tmp_path / "model"), plans_edit, dataset_edit,
                     lambda checkpoint: checkpoint["init_args"].update(configuration=configuration))
    with pytest.raises(ModelError) as refusal:
        load_model(folder)
    assert message in refusal.value.message and "\n" not in refusal.value.message


@pytest.fixture
def three_class_model(tmp_path) -> LoadedModel:
    def labels(dataset):
        dataset["labels"] = {"background": 0, "lesion": 1, "enhancing": 2}

    def weights(checkpoint):
        checkpoint["network_weights"] = tiny_unet(classes=3).state_dict()
    return load_model(rewrite(write_model_folder(tmp_path / "model"), dataset_edit=labels, checkpoint_edit=weights))


def test_label_to_explain_by_name_or_id_and_ambiguity_is_an_error(three_class_model, tmp_path):
    with pytest.raises(ModelError, match=r"2 foreground labels \(1 \(lesion\), 2 \(enhancing\)\); choose the one "
                                         r"to explain with --label NAME\|ID"):
        three_class_model.resolve_label(None)
    assert three_class_model.resolve_label("enhancing") == 2 and three_class_model.resolve_label("1") == 1
    with pytest.raises(ModelError, match="--label 3: not a foreground label"):
        three_class_model.resolve_label("3")
    assert load_model(write_model_folder(tmp_path / "two")).resolve_label(None) == 1


def test_several_classes_segment_by_argmax_and_refuse_a_threshold(three_class_model):
    probabilities = np.array([[0.5, 0.2, 0.3], [0.3, 0.45, 0.3], [0.2, 0.35, 0.4]])[..., None]  # (K, 3, 1)
    # voxel 1: label 1 wins with 0.45 (below 0.5, so a threshold would have missed it); voxel 2: label 2 wins
    assert LoadedModel.segment(probabilities, 1).ravel().tolist() == [False, True, False]
    assert LoadedModel.segment(probabilities, 2).ravel().tolist() == [False, False, True]
    with pytest.raises(ModelError, match="--threshold 0.4 applies to two-class models only; with 3 classes"):
        three_class_model.check_threshold(0.4)
    two_class = np.array([[0.55, 0.65], [0.45, 0.35]])
    assert LoadedModel.segment(two_class, 1, 0.4).tolist() == [True, False]
