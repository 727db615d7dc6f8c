"""Reduced CPU plans (nnxai/nnunet/plans.py): valid for nnU-Net, same preprocessed data, small network."""
import json

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fake_nnunet import plan_fake_dataset
from nnxai.nnunet.plans import PlansError, write_small_plans

DATASET_ID = 951


@pytest.fixture(scope="module")
def source_plans(tmp_path_factory):
    """nnU-Net's own nnUNetPlans.json for a tiny fake dataset, in temporary nnU-Net folders."""
    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            patch.setenv(name, str(root / name))
        yield plan_fake_dataset(DATASET_ID)


def test_small_plans_keep_data_and_shrink_network(source_plans):
    path = write_small_plans(DATASET_ID)
    assert path == source_plans.with_name("nnxaiCPUPlans.json")
    source = json.loads(source_plans.read_text())["configurations"]["3d_fullres"]
    small = json.loads(path.read_text())
    assert small["plans_name"] == "nnxaiCPUPlans"
    assert list(small["configurations"]) == ["3d_fullres"]
    config = small["configurations"]["3d_fullres"]
    assert config["data_identifier"] == source["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert config["spacing"] == source["spacing"]
    assert config["patch_size"] == [64, 64, 64] and config["batch_size"] == 2
    arch = config["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 4 and arch["features_per_stage"] == [8, 16, 32, 64]
    assert arch["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert arch["kernel_sizes"] == [[3, 3, 3]] * 4
    assert arch["n_conv_per_stage"] == [2] * 4 and arch["n_conv_per_stage_decoder"] == [2] * 3
    assert not list(path.parent.glob(".*tmp*")), "temporary file left behind"


def test_nnunet_builds_and_runs_the_small_network(source_plans):
    plans_manager = PlansManager(str(write_small_plans(DATASET_ID)))
    configuration = plans_manager.get_configuration("3d_fullres")
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, 2, 2, True)
    assert sum(p.numel() for p in network.parameters()) < 500_000
    with torch.no_grad():
        outputs = network(torch.randn(1, 2, *configuration.patch_size))
    assert [tuple(o.shape) for o in outputs] == [(1, 2, 64, 64, 64), (1, 2, 32, 32, 32), (1, 2, 16, 16, 16)]


def test_custom_size_and_name(source_plans):
    path = write_small_plans(f"Dataset{DATASET_ID}_Fake", plans_name="tinyPlans", patch_size=(32, 48, 32),
                             features=(4, 8, 16), batch_size=1, convs_per_stage=1)
    plans_manager = PlansManager(str(path))
    configuration = plans_manager.get_configuration("3d_fullres")
    assert plans_manager.plans_name == "tinyPlans" and configuration.batch_size == 1
    assert configuration.pool_op_kernel_sizes == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, 2, 2, False)
    with torch.no_grad():
        assert network(torch.randn(1, 2, 32, 48, 32)).shape == (1, 2, 32, 48, 32)


def test_bad_requests_name_the_problem_and_write_nothing(source_plans):
    bad = {"plans_name": "badPlans"}
    with pytest.raises(PlansError, match="divisible by 8"):
        write_small_plans(DATASET_ID, patch_size=(60, 64, 64), **bad)
    with pytest.raises(PlansError, match="has 2 axes"):
        write_small_plans(DATASET_ID, patch_size=(64, 64), **bad)
    with pytest.raises(PlansError, match="noSuchPlans.json: no such plans file"):
        write_small_plans(DATASET_ID, source_plans="noSuchPlans", **bad)
    with pytest.raises(PlansError, match="no configuration '3d_lowres'"):
        write_small_plans(DATASET_ID, configuration="3d_lowres", **bad)
    assert not source_plans.with_name("badPlans.json").exists()
