"""A tiny trained-looking nnU-Net model folder and oblique, anisotropic input cases, built in a second."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from tests.conftest import tiny_unet

CONFIGURATION = {
    "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
    "patch_size": [16, 16, 16], "median_image_size_in_voxels": [24, 24, 24], "spacing": [1.5, 1.5, 1.5],
    "normalization_schemes": ["ZScoreNormalization", "ZScoreNormalization"], "use_mask_for_norm": [False, False],
    "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                        "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    "batch_dice": False,
}
INTENSITIES = {"max": 3.0, "mean": 0.0, "median": 0.0, "min": -3.0, "percentile_00_5": -2.5,
               "percentile_99_5": 2.5, "std": 1.0}
DATASET_JSON = {"channel_names": {"0": "FLAIR", "1": "T1"}, "labels": {"background": 0, "lesion": 1},
                "numTraining": 2, "file_ending": ".nii.gz"}


def plans(transpose_forward=(0, 2, 1)) -> dict:
    """nnU-Net plans for the tiny network; the transposition and 1.5 mm spacing exercise the geometry code."""
    backward = list(np.argsort(transpose_forward))
    return {"dataset_name": "Dataset998_Fake", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.5, 1.5, 1.5], "original_median_shape_after_transp": [24] * 3,
            "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose_forward),
            "transpose_backward": [int(b) for b in backward], "configurations": {"3d_fullres": copy.deepcopy(CONFIGURATION)},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": INTENSITIES, "1": INTENSITIES}}


def blob_batch(rng: np.random.Generator, n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-scored two-channel noise with 1-3 spherical lesions each: bright on channel 0, dark on channel 1."""
    x = rng.normal(0, 1, (n, 2, size, size, size)).astype(np.float32)
    y = np.zeros((n, size, size, size), np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            centre, radius = rng.uniform(2, size - 2, 3)[:, None, None, None], rng.uniform(1.5, 3.5)
            y[i][((grid - centre) ** 2).sum(0) < radius ** 2] = 1
        x[i, 0] += 3 * y[i]
        x[i, 1] -= y[i]
    return torch.from_numpy(x), torch.from_numpy(y)


@functools.lru_cache
def trained_weights(seed: int = 0, steps: int = 40) -> dict:
    """Weights of the tiny network after a few seconds of training to segment bright FLAIR blobs (Dice ~0.9)."""
    network = tiny_unet(seed=seed).train()
    optimizer = torch.optim.Adam(network.parameters(), 3e-2)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x, y = blob_batch(rng)
        loss = torch.nn.functional.cross_entropy(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def write_model_folder(folder: Path, folds=(0,), seed: int = 0) -> Path:
    """plans.json, dataset.json and fold_X/checkpoint_final.pth (a trained tiny network) as nnU-Net lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = plans()
    (folder / "plans.json").write_text(json.dumps(plan))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": trained_weights(seed + int(fold)), "optimizer_state": None, "grad_scaler_state": None,
                    "logging": {}, "_best_ema": None, "current_epoch": 1,
                    "init_args": {"plans": plan, "configuration": "3d_fullres", "fold": fold,
                                  "dataset_json": DATASET_JSON},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


OBLIQUE_DIRECTION = tuple(np.array([[0.9659258, -0.258819, 0.0], [0.258819, 0.9659258, 0.0], [0.0, 0.0, 1.0]]).ravel())


def write_case(images_dir: Path, case: str, seed: int, size=(20, 26, 14), spacing=(1.2, 1.0, 2.0),
               labels_dir: Path | None = None) -> np.ndarray:
    """Two channels (bright blobs on FLAIR) with an oblique direction and anisotropic spacing; returns the GT array."""
    rng = np.random.default_rng(seed)
    shape = size[::-1]  # SimpleITK arrays are (z, y, x)
    gt = np.zeros(shape, np.uint8)
    gt[4:7, 5:9, 4:8] = 1
    gt[9:12, 15:19, 12:16] = 1
    flair = rng.normal(0, 1, shape) + 3 * gt
    t1 = rng.normal(0, 1, shape) - gt
    images_dir.mkdir(parents=True, exist_ok=True)
    for channel, array in enumerate((flair, t1)):
        _write(array.astype(np.float32), images_dir / f"{case}_{channel:04d}.nii.gz", spacing)
    if labels_dir is not None:
        labels_dir.mkdir(parents=True, exist_ok=True)
        _write(gt, labels_dir / f"{case}.nii.gz", spacing)
    return gt


def _write(array: np.ndarray, path: Path, spacing) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, 20.0, 5.0))
    image.SetDirection(OBLIQUE_DIRECTION)
    sitk.WriteImage(image, str(path))


def plans_manager() -> PlansManager:
    return PlansManager(plans())
