"""Loading a trained nnU-Net v2 model (one or several folds) the way `nnUNetv2_predict` does, but safely."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager, determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnxai.errors import InputError
from nnxai.nnunet.checkpoint import load_checkpoint
from nnxai.nnunet.environment import register_trainers
from nnxai.nnunet.model_safety import UnsafeModelError, check_model_names, find_trainer
from nnxai.nnunet.sliding_window import SlidingWindow


class ModelError(InputError):
    """A model folder, fold or checkpoint that cannot be used."""


@dataclass
class LoadedModel:
    """A trained nnU-Net model: one network per fold plus the plans that define its input and output."""

    folder: Path
    folds: list[str]
    checkpoint_name: str
    networks: list[nn.Module]
    plans_manager: PlansManager
    configuration_manager: ConfigurationManager
    dataset_json: dict
    trainer_name: str
    configuration: str
    mirror_axes: tuple[int, ...] | None
    checkpoint_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def label_manager(self) -> LabelManager:
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def channel_names(self) -> list[str]:
        """Input channel names from dataset.json (`channel_names` or the older `modality`), in channel order."""
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return [names[key] for key in sorted(names, key=int)]

    def sliding_window(self, step_size: float = 0.5, use_mirroring: bool = True,
                       device: torch.device | str = "cpu") -> SlidingWindow:
        """A differentiable sliding window with this model's patch size and allowed mirroring axes."""
        networks = [network.to(device) for network in self.networks]
        return SlidingWindow(networks, self.configuration_manager.patch_size, step_size,
                             self.mirror_axes if use_mirroring else None, device=device)

    def nnunet_logits(self, data: torch.Tensor, step_size: float = 0.5, use_mirroring: bool = True,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """Logits (K, *spatial) of a preprocessed volume from nnU-Net's own predictor: its float16 accumulation,
        CUDA autocast and fold averaging, in its own dtype (float16), so that resampling them for export rounds
        as nnU-Net's export does and segmentations equal `nnUNetv2_predict`'s voxel for voxel."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        device = torch.device(device)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a note on every CPU construction
            predictor = nnUNetPredictor(tile_step_size=step_size, use_mirroring=use_mirroring,
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        allow_tqdm=False)
        # nnU-Net loads each fold's weights into one network: give it a copy so ours keep theirs.
        predictor.manual_initialization(copy.deepcopy(self.networks[0]).to(device), self.plans_manager,
                                        self.configuration_manager, [n.state_dict() for n in self.networks],
                                        self.dataset_json, self.trainer_name, self.mirror_axes)
        return predictor.predict_logits_from_preprocessed_data(data)

    def foreground_labels(self) -> dict[int, str]:
        """Foreground label ids -> names, from dataset.json."""
        return {int(value): name for name, value in self.dataset_json["labels"].items()
                if isinstance(value, int) and value != 0}

    def resolve_label(self, requested: str | int | None = None) -> int:
        """The label to explain: `requested` as id or name, or the only foreground label; one-line errors."""
        labels = self.foreground_labels()
        listing = ", ".join(f"{label_id} ({name})" for label_id, name in sorted(labels.items()))
        if requested is None:
            if len(labels) == 1:
                return next(iter(labels))
            raise ModelError(f"{self.folder / 'dataset.json'}: {len(labels)} foreground labels ({listing}); "
                             "choose the one to explain with --label NAME|ID")
        by_name = {name: label_id for label_id, name in labels.items()}
        text = str(requested)
        label = int(text) if text.isdigit() else by_name.get(text)
        if label not in labels:
            raise ModelError(f"--label {text}: not a foreground label of {self.folder / 'dataset.json'} "
                             f"(has {listing})")
        return label

    def check_threshold(self, threshold: float) -> None:
        """A probability threshold other than 0.5 is meaningful for two-class models only."""
        _check_threshold(self.label_manager.num_segmentation_heads, threshold)

    @staticmethod
    def segment(probabilities: np.ndarray, label: int, threshold: float = 0.5) -> np.ndarray:
        """Voxels segmented as `label` from (K, *spatial) probabilities: with two classes, probability > threshold
        (0.5 is nnU-Net's argmax); with more, nnU-Net's argmax (the threshold must then be 0.5)."""
        _check_threshold(len(probabilities), threshold)
        if len(probabilities) == 2:
            return probabilities[label] > threshold
        return probabilities.argmax(0) == label

    def describe(self) -> dict:
        """What identifies this model in a run record."""
        return {"folder": str(self.folder), "trainer": self.trainer_name, "configuration": self.configuration,
                "plans": self.plans_manager.plans_name, "folds": self.folds, "checkpoint": self.checkpoint_name,
                "checkpoint_sha256": self.checkpoint_sha256}


def model_folder(dataset: str, configuration: str, trainer: str = "nnUNetTrainer",
                 plans: str = "nnUNetPlans") -> Path:
    """`$nnUNet_results/DatasetNNN_Name/Trainer__Plans__config`, as `nnUNetv2_predict -d -c -tr -p` finds it."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        return Path(get_output_folder(dataset, trainer, plans, configuration))
    except (RuntimeError, ValueError) as error:  # unknown dataset id or name
        raise ModelError(f"-d {dataset}: {str(error).splitlines()[0]}") from None


def available_folds(folder: Path, checkpoint_name: str) -> list[str]:
    """Folds with the checkpoint present (nnU-Net's auto-detection: numbered folds, not `fold_all`)."""
    found = [p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / checkpoint_name).is_file()]
    return sorted((f for f in found if f != "all"), key=int)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path}: missing; not an nnU-Net model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: not valid JSON ({error.msg})") from None


def load_model(folder: str | Path, folds: list[str] | None = None, checkpoint_name: str = "checkpoint_final.pth",
               trust_checkpoint: bool = False) -> LoadedModel:
    """Load the networks of `folds` (default: all present) from an nnU-Net results folder, on the CPU.

    Checkpoints are unpickled safely and every name the plans, dataset.json and checkpoint give nnU-Net to
    resolve is checked against allow-lists before anything is built; `trust_checkpoint` lifts both checks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    dataset_json = _read_json(folder / "dataset.json")
    plans_manager = PlansManager(_read_json(folder / "plans.json"))
    folds = [str(f) for f in folds] if folds else available_folds(folder, checkpoint_name)
    if not folds:
        raise ModelError(f"{folder}: no fold_*/{checkpoint_name} found")
    checkpoints, hashes = [], {}
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint_name
        if not path.is_file():
            present = available_folds(folder, checkpoint_name)
            raise ModelError(f"{path}: fold {fold} has no {checkpoint_name} (folds present: {present or 'none'})")
        checkpoints.append(load_checkpoint(path, trust=trust_checkpoint))
        hashes[fold] = _sha256(path)
    first = checkpoints[0]
    configuration = first["init_args"]["configuration"]
    if configuration not in plans_manager.available_configurations:
        raise ModelError(f"{folder / 'plans.json'}: no configuration {configuration!r}, which the checkpoint "
                         f"was trained with (has {plans_manager.available_configurations})")
    configuration_manager = plans_manager.get_configuration(configuration)
    register_trainers()
    try:
        if not trust_checkpoint:
            check_model_names(folder, plans_manager.plans, configuration_manager.configuration, dataset_json,
                              configuration)
        _check_supported(folder, configuration, configuration_manager, plans_manager, dataset_json)
        trainer_class = find_trainer(first["trainer_name"], folder / f"fold_{folds[0]}" / checkpoint_name)
    except UnsafeModelError as error:
        raise ModelError(str(error)) from None
    networks = []
    for checkpoint in checkpoints:
        network = _build_network(trainer_class, plans_manager, configuration_manager, dataset_json)
        network.load_state_dict(_uncompiled(checkpoint["network_weights"]))
        networks.append(network.eval())
    mirror_axes = first.get("inference_allowed_mirroring_axes")
    return LoadedModel(folder, folds, checkpoint_name, networks, plans_manager, configuration_manager, dataset_json,
                       first["trainer_name"], configuration, tuple(mirror_axes) if mirror_axes else None, hashes)


def _check_threshold(classes: int, threshold: float) -> None:
    if classes > 2 and threshold != 0.5:
        raise ModelError(f"--threshold {threshold:g} applies to two-class models only; with {classes} classes "
                         "the segmentation is nnU-Net's argmax")


def _check_supported(folder: Path, configuration: str, configuration_manager: ConfigurationManager,
                     plans_manager: PlansManager, dataset_json: dict) -> None:
    """Refuse, in one line, configurations whose prediction nnxai does not reproduce."""
    if len(configuration_manager.patch_size) != 3:
        raise ModelError(f"{folder}: configuration {configuration!r} is 2D; nnxai explains 3D configurations "
                         "(3d_fullres, 3d_lowres)")
    if configuration_manager.configuration.get("previous_stage"):
        raise ModelError(f"{folder}: configuration {configuration!r} is a cascade stage, whose input includes the "
                         "previous stage's segmentation; explain that stage's 3d_lowres model or a 3d_fullres one")
    if plans_manager.get_label_manager(dataset_json).has_regions:
        raise ModelError(f"{folder / 'dataset.json'}: region-based labels (regions_class_order) are not supported; "
                         "nnxai explains one label of a softmax model")


def _uncompiled(weights: dict) -> dict:
    """A state dict saved from a `torch.compile`d network has every key under `_orig_mod.`: drop that prefix."""
    prefix = "_orig_mod."
    if weights and all(key.startswith(prefix) for key in weights):
        return {key.removeprefix(prefix): value for key, value in weights.items()}
    return weights


def _build_network(trainer_class, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                   dataset_json: dict) -> nn.Module:
    """The trainer's own architecture without deep supervision, as nnU-Net builds it for inference."""
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                                        num_outputs, enable_deep_supervision=False)
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, num_inputs, num_outputs,
        enable_deep_supervision=False)
