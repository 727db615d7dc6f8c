"""Names in a model folder that nnU-Net turns into code, checked against allow-lists before anything is built.

nnU-Net resolves strings from `plans.json`, `dataset.json` and the checkpoint to classes and functions
(`pydoc.locate` of dotted paths, a search by name through its own packages) and calls them with keyword
arguments from the same files: a `plans.json` naming `os.system` as the network's non-linearity runs a
shell command while the network is built. A model folder is untrusted input, so every such name must
resolve to an object of the kind nnU-Net itself puts there; anything else is refused, naming the file,
the key and the value, unless the user trusts the model (`--trust-model`).
"""
from __future__ import annotations

import inspect
import pydoc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nnunetv2
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from torch import nn

from nnxai.errors import InputError

TRUST_MODEL_FLAG = "--trust-model"


class UnsafeModelError(InputError, ValueError):
    """A model folder names code outside the allow-lists (one-line message)."""


@dataclass(frozen=True)
class DottedPath:
    """A dotted import path allowed only under `package`, resolving to a subclass of nn.Module defined there."""

    package: str
    allowed: str

    def resolve(self, value: str) -> object | None:
        if not value.startswith(self.package + "."):
            return None
        found = pydoc.locate(value)  # imports modules below `package` only
        return found if _is_module_class(found, self.package) else None


@dataclass(frozen=True)
class NnunetName:
    """A bare name that nnU-Net looks up in its own `subpackage`, allowed when `accept` holds for what it finds."""

    subpackage: str
    accept: Callable[[object], bool]
    allowed: str

    def resolve(self, value: str) -> object | None:
        if not value.isidentifier():
            return None
        found = recursive_find_python_class(str(Path(nnunetv2.__path__[0], *self.subpackage.split("."))), value,
                                            current_module=f"nnunetv2.{self.subpackage}")
        return found if found is not None and self.accept(found) else None


def _is_module_class(found: object, package: str) -> bool:
    return (inspect.isclass(found) and issubclass(found, nn.Module)
            and found.__module__.startswith(package + "."))


def _subclass_of(base_path: str) -> Callable[[object], bool]:
    def accept(found: object) -> bool:
        base = pydoc.locate(base_path)
        return inspect.isclass(found) and issubclass(found, base) and found.__module__.startswith("nnunetv2.")
    return accept


def _resampling_function(found: object) -> bool:
    return inspect.isfunction(found) and found.__module__.startswith("nnunetv2.preprocessing.resampling")


NETWORK = DottedPath("dynamic_network_architectures.architectures", "a network class of dynamic_network_architectures")
TORCH_LAYER = DottedPath("torch.nn", "a layer class of torch.nn")
PREPROCESSOR = NnunetName("preprocessing", _subclass_of(
    "nnunetv2.preprocessing.preprocessors.default_preprocessor.DefaultPreprocessor"), "an nnU-Net preprocessor")
NORMALIZATION = NnunetName("preprocessing.normalization", _subclass_of(
    "nnunetv2.preprocessing.normalization.default_normalization_schemes.ImageNormalization"),
    "an nnU-Net normalization scheme")
RESAMPLING = NnunetName("preprocessing.resampling", _resampling_function, "an nnU-Net resampling function")
READER_WRITER = NnunetName("imageio", _subclass_of("nnunetv2.imageio.base_reader_writer.BaseReaderWriter"),
                           "an nnU-Net image reader/writer")
LABEL_MANAGER = NnunetName("utilities.label_handling", _subclass_of(
    "nnunetv2.utilities.label_handling.label_handling.LabelManager"), "an nnU-Net label manager")


def _check(kind: DottedPath | NnunetName, value: object, file: Path, key: str) -> None:
    if isinstance(value, str) and kind.resolve(value) is not None:
        return
    raise UnsafeModelError(f"{file}: {key} = {value!r} is not {kind.allowed}; refusing to load a model that names "
                           f"other code (use {TRUST_MODEL_FLAG} only if you trust its source)")


def named_code(plans: dict, configuration: dict, dataset_json: dict, configuration_name: str
               ) -> list[tuple[str, str, object, DottedPath | NnunetName]]:
    """(file, key, value, kind) of every name nnU-Net resolves when it builds and runs this configuration."""
    prefix = f"configurations.{configuration_name}"
    architecture = configuration["architecture"]
    arch_kwargs = architecture.get("arch_kwargs", {})
    named = [("plans.json", f"{prefix}.architecture.network_class_name", architecture.get("network_class_name"),
              NETWORK)]
    for key in architecture.get("_kw_requires_import", []):
        if arch_kwargs.get(key) is not None:
            named.append(("plans.json", f"{prefix}.architecture.arch_kwargs.{key}", arch_kwargs[key], TORCH_LAYER))
    named.append(("plans.json", f"{prefix}.preprocessor_name", configuration.get("preprocessor_name"),
                  PREPROCESSOR))
    named += [("plans.json", f"{prefix}.normalization_schemes[{i}]", scheme, NORMALIZATION)
              for i, scheme in enumerate(configuration.get("normalization_schemes", []))]
    named += [("plans.json", f"{prefix}.{key}", configuration.get(key), RESAMPLING)
              for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")]
    named.append(("plans.json", "image_reader_writer", plans.get("image_reader_writer"), READER_WRITER))
    if "label_manager" in plans:
        named.append(("plans.json", "label_manager", plans["label_manager"], LABEL_MANAGER))
    if "overwrite_image_reader_writer" in dataset_json:
        named.append(("dataset.json", "overwrite_image_reader_writer", dataset_json["overwrite_image_reader_writer"],
                      READER_WRITER))
    return named


def check_model_names(folder: Path, plans: dict, configuration: dict, dataset_json: dict,
                      configuration_name: str) -> None:
    """Refuse a model folder whose plans or dataset.json name code outside the allow-lists, before any is built.

    `configuration` is the configuration with its inheritance resolved, as nnU-Net builds it.
    """
    architecture = configuration.get("architecture")
    if not (isinstance(architecture, dict) and isinstance(architecture.get("arch_kwargs", {}), dict)
            and isinstance(architecture.get("_kw_requires_import", []), list)):
        raise UnsafeModelError(f"{folder / 'plans.json'}: configurations.{configuration_name}.architecture is not "
                               "nnU-Net's (network_class_name, arch_kwargs, _kw_requires_import)")
    for file, key, value, kind in named_code(plans, configuration, dataset_json, configuration_name):
        _check(kind, value, folder / file, key)


def find_trainer(name: object, checkpoint: Path) -> type:
    """The trainer class a checkpoint names, looked up only among nnU-Net's trainers and `nnUNet_extTrainer`'s."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    if isinstance(name, str) and name.isidentifier():
        try:
            return recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError, TypeError):  # not found, or found but not an nnUNetTrainer
            pass
    raise UnsafeModelError(f"{checkpoint}: trainer_name = {name!r} is not an nnU-Net trainer (searched nnU-Net's "
                           "trainers and nnUNet_extTrainer)")
