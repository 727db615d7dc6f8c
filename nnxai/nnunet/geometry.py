"""Between the input image and the network: nnU-Net's preprocessing, its inverse, and NIfTI output.

The network sees a transposed, cropped-to-nonzero, normalized and resampled volume ("network space").
Everything a user opens (predictions, instances, maps) is written back in the input's own grid and
orientation ("original space") with the input's geometry, so it overlays the scan in ITK-SNAP/FSLeyes.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, insert_crop_into_image
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

from nnxai.nnunet.model import LoadedModel


def read_images(model: LoadedModel, image_files: list[str | Path]) -> tuple[np.ndarray, dict]:
    """The case's channels (C, *input array shape) and geometry, read by the model's own image reader."""
    return model.plans_manager.image_reader_writer_class().read_images([str(f) for f in image_files])


def preprocess_array(model: LoadedModel, images: np.ndarray, properties: dict) -> np.ndarray:
    """nnU-Net's own preprocessing of read images to the (C, *network shape) input; fills `properties` in."""
    preprocessor = model.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case_npy(images, None, properties, model.plans_manager,
                                           model.configuration_manager, model.dataset_json)
    return np.asarray(data, dtype=np.float32)


def preprocess(model: LoadedModel, image_files: list[str | Path]) -> tuple[np.ndarray, dict]:
    """Read and preprocess one case as nnU-Net does: network input and the properties to undo it."""
    images, properties = read_images(model, image_files)
    return preprocess_array(model, images, properties), properties


def _network_and_original_spacing(model: LoadedModel, properties: dict) -> tuple[list[float], list[float]]:
    original = [properties["spacing"][i] for i in model.plans_manager.transpose_forward]
    network = list(model.configuration_manager.spacing)
    if len(network) < len(original):  # 2d configurations keep the slice spacing
        network = [original[0], *network]
    return network, original


def probabilities_in_original_space(model: LoadedModel, logits: torch.Tensor, properties: dict) -> np.ndarray:
    """Softmax probabilities (K, *input shape), resampled, uncropped and transposed back exactly as nnU-Net exports.

    The logits are resampled in their own dtype, as nnU-Net's export resamples its float16 logits: resampling
    rounds to that dtype, which decides near-ties between classes."""
    _, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.detach().cpu(), model.plans_manager, model.configuration_manager, model.label_manager,
        properties, return_probabilities=True, num_threads_torch=torch.get_num_threads())
    return probabilities


def to_network_space(model: LoadedModel, labels: np.ndarray, properties: dict) -> np.ndarray:
    """Map a label volume from original space to network space the way nnU-Net maps segmentations."""
    transposed = labels.transpose(model.plans_manager.transpose_forward)
    cropped = transposed[bounding_box_to_slice(properties["bbox_used_for_cropping"])]
    target_shape = _network_shape(model, properties)
    if tuple(cropped.shape) == tuple(target_shape):
        return cropped.copy()
    network_spacing, original_spacing = _network_and_original_spacing(model, properties)
    resampled = model.configuration_manager.resampling_fn_seg(cropped[None], target_shape, original_spacing,
                                                              network_spacing)
    return np.asarray(resampled[0]).astype(labels.dtype)


def _network_shape(model: LoadedModel, properties: dict) -> list[int]:
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    network_spacing, original_spacing = _network_and_original_spacing(model, properties)
    return list(compute_new_shape(properties["shape_after_cropping_and_before_resampling"], original_spacing,
                                  network_spacing))


def to_original_space(model: LoadedModel, volume: np.ndarray, properties: dict) -> np.ndarray:
    """Map a (C, *network shape) float volume to (C, *input shape): resample, uncrop (zeros), transpose back."""
    network_spacing, original_spacing = _network_and_original_spacing(model, properties)
    cropped_shape = properties["shape_after_cropping_and_before_resampling"]
    if tuple(volume.shape[1:]) != tuple(cropped_shape):
        volume = np.asarray(model.configuration_manager.resampling_fn_probabilities(
            volume, cropped_shape, network_spacing, original_spacing), dtype=np.float32)
    full = np.zeros((volume.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    full = insert_crop_into_image(full, volume, [[0, volume.shape[0]], *properties["bbox_used_for_cropping"]])
    return full.transpose([0, *(axis + 1 for axis in model.plans_manager.transpose_backward)])


def voxel_volume_mm3(properties: dict) -> float:
    """Volume of one input voxel in mm^3."""
    return float(np.prod(properties["spacing"]))


def world_coordinates(properties: dict, index: np.ndarray) -> np.ndarray:
    """World (scanner) coordinates in mm, RAS+ as NIfTI viewers show them, of array indices of the input."""
    index = np.asarray(index, dtype=float)[::-1]  # arrays are (z, y, x); image indices are (x, y, z)
    if "sitk_stuff" in properties:
        geometry = properties["sitk_stuff"]
        direction = np.asarray(geometry["direction"]).reshape(3, 3)
        lps = np.asarray(geometry["origin"]) + direction @ (np.asarray(geometry["spacing"]) * index)
        return lps * np.array([-1.0, -1.0, 1.0])
    return (_nibabel_affine(properties) @ np.append(index, 1.0))[:3]


def _nibabel_affine(properties: dict) -> np.ndarray:
    geometry = properties.get("nibabel_stuff", {})
    if "reoriented_affine" in geometry or "original_affine" not in geometry:
        raise ValueError("only SimpleITKIO and NibabelIO image readers are supported for writing maps")
    return np.asarray(geometry["original_affine"])


def write_volume(array: np.ndarray, path: Path, properties: dict) -> None:
    """Write an input-shaped array as NIfTI with the input's geometry (dtype kept: float maps stay float)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if "sitk_stuff" in properties:
        geometry = properties["sitk_stuff"]
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
        sitk.WriteImage(image, os.fspath(path), True)
    else:
        nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), _nibabel_affine(properties)), path)
