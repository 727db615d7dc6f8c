"""Shared fixtures: tiny nnU-Net networks and model folders that build in milliseconds."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn


def tiny_unet(seed: int = 0, in_channels: int = 2, classes: int = 2) -> nn.Module:
    """A 2-stage PlainConvUNet (nnU-Net's own architecture) with 4 and 8 features, in eval mode."""
    torch.manual_seed(seed)
    network = PlainConvUNet(
        input_channels=in_channels, n_stages=2, features_per_stage=(4, 8), conv_op=nn.Conv3d,
        kernel_sizes=3, strides=(1, 2), n_conv_per_stage=(1, 1), num_classes=classes,
        n_conv_per_stage_decoder=(1,), conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )
    return network.eval()


@pytest.fixture
def unet() -> nn.Module:
    return tiny_unet()
