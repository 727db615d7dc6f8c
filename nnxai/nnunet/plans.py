"""Reduced-size nnU-Net plans for CPU: a small network on nnU-Net's already preprocessed data.

The new plans file sits next to nnU-Net's (`$nnUNet_preprocessed/DatasetNNN_Name/<plans_name>.json`) and keeps
the configuration's `data_identifier`, so `nnUNetv2_train ... -p <plans_name>` reads the data that
`nnUNetv2_plan_and_preprocess` already wrote: only the network, patch and batch change.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnxai.errors import InputError

CPU_PLANS_NAME = "nnxaiCPUPlans"
CPU_PATCH_SIZE = (64, 64, 64)
CPU_FEATURES = (8, 16, 32, 64)


class PlansError(InputError, ValueError):
    """Plans that cannot be reduced as asked (missing source, unknown configuration, patch not divisible)."""


def small_architecture(architecture_kwargs: dict, patch_size: Sequence[int], features: Sequence[int],
                       convs_per_stage: int) -> dict:
    """`architecture_kwargs` of a U-Net plan resized: len(features) stages, 3^d kernels, stride 2 below stage 0."""
    n_stages = len(features)
    dim = len(patch_size)
    downsampling = 2 ** (n_stages - 1)
    if any(size % downsampling for size in patch_size):
        raise PlansError(f"patch size {tuple(patch_size)} must be divisible by {downsampling} "
                         f"for {n_stages} stages")
    encoder_blocks_key = "n_blocks_per_stage" if "n_blocks_per_stage" in architecture_kwargs else "n_conv_per_stage"
    return {
        **architecture_kwargs,
        "n_stages": n_stages,
        "features_per_stage": list(features),
        "kernel_sizes": [[3] * dim for _ in range(n_stages)],
        "strides": [[1] * dim] + [[2] * dim for _ in range(n_stages - 1)],
        encoder_blocks_key: [convs_per_stage] * n_stages,
        "n_conv_per_stage_decoder": [convs_per_stage] * (n_stages - 1),
    }


def write_small_plans(dataset_name_or_id: int | str, plans_name: str = CPU_PLANS_NAME,
                      patch_size: Sequence[int] = CPU_PATCH_SIZE, features: Sequence[int] = CPU_FEATURES,
                      batch_size: int = 2, convs_per_stage: int = 2, source_plans: str = "nnUNetPlans",
                      configuration: str = "3d_fullres") -> Path:
    """Write `<plans_name>.json` beside `<source_plans>.json` with a reduced `configuration`; returns its path.

    Only `configuration` is kept (inheritance resolved), so the small plans cannot start a large sibling
    configuration by mistake. Written atomically (temporary file, then rename).
    """
    if not features or batch_size < 1 or convs_per_stage < 1:
        raise PlansError("features must be non-empty and batch_size, convs_per_stage positive")
    dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    folder = Path(nnUNet_preprocessed, dataset_name)
    source_file = folder / f"{source_plans}.json"
    if not source_file.is_file():
        raise PlansError(f"{source_file}: no such plans file (run nnUNetv2_plan_and_preprocess first)")
    plans_manager = PlansManager(str(source_file))
    if configuration not in plans_manager.available_configurations:
        raise PlansError(f"{source_file}: no configuration {configuration!r} "
                         f"(has {plans_manager.available_configurations})")
    config = plans_manager.get_configuration(configuration).configuration
    if len(patch_size) != len(config["patch_size"]):
        raise PlansError(f"patch size {tuple(patch_size)} has {len(patch_size)} axes, "
                         f"configuration {configuration!r} has {len(config['patch_size'])}")
    if config.get("previous_stage"):
        raise PlansError(f"{source_file}: configuration {configuration!r} is a cascade stage; "
                         "reduce 3d_fullres instead")
    config.pop("inherits_from", None)
    config.pop("next_stage", None)
    config.update(patch_size=list(patch_size), batch_size=batch_size)
    config["architecture"]["arch_kwargs"] = small_architecture(config["architecture"]["arch_kwargs"], patch_size,
                                                               features, convs_per_stage)
    plans = {**plans_manager.plans, "plans_name": plans_name, "configurations": {configuration: config}}
    target = folder / f"{plans_name}.json"
    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(plans, indent=4))
    temporary.replace(target)
    return target
