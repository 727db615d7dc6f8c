"""Loading nnU-Net v2 checkpoints without running code hidden in them.

nnU-Net itself loads checkpoints with `torch.load(weights_only=False)`, i.e. full unpickling, which
runs whatever callable the file names. nnxai unpickles with `weights_only=True` (tensors and plain
Python containers only) plus the few numpy types that nnU-Net's trainer really writes, and refuses
everything else unless the user says they trust the file (`--trust-model`, formerly `--trust-checkpoint`).
"""
from __future__ import annotations

import importlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from nnxai.errors import InputError

# Keys `nnUNetPredictor.initialize_from_trained_model_folder` reads; `inference_allowed_mirroring_axes`
# is optional there (older checkpoints lack it), so it is not required here either.
REQUIRED_KEYS = ("network_weights", "init_args", "trainer_name")
TRUST_FLAG = "--trust-model"  # the CLI flag that sets trust=True (alias --trust-checkpoint)


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded safely or is not an nnU-Net checkpoint (one-line message)."""


def _numpy_scalar_constructor():
    """numpy's scalar-unpickling function (`numpy._core` since numpy 2, `numpy.core` before)."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module).scalar
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy provides no multiarray.scalar")


def nnunet_safe_globals() -> list:
    """The types beyond torch's own allow-list that nnU-Net v2 checkpoints contain.

    The trainer's logger (`logging`) and `_best_ema` hold numpy scalars (losses, pseudo Dice,
    its moving average): a numpy scalar pickles as `multiarray.scalar(dtype, raw bytes)`, the
    dtype as `numpy.dtype(code, ...)` followed by a state update of the concrete dtype class.
    The values are float32 under numpy 2; numpy 1 promoted the moving average to float64.
    Checkpoints written under numpy 1 name the scalar function `numpy.core.multiarray.scalar`,
    under numpy 2 `numpy._core.multiarray.scalar`; both names map to the same function.
    Everything else (tensors, OrderedDict state dicts, torch.device in `init_args`, ints,
    floats, strings, lists, tuples, dicts, None) is on torch's default allow-list.
    """
    scalar = _numpy_scalar_constructor()
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        type(np.dtype(np.float32)),
        type(np.dtype(np.float64)),
    ]


# How torch's restricted unpickler names what it refused (unlisted global, class to build or
# instantiate, function to call).
_REFUSAL_PATTERNS = (r"GLOBAL (\S+) ", r"but got <class '([^']+)'>", r"unrecognized function (.+?)(?: which belongs|$)")


def _offending_types(path: Path, error: pickle.UnpicklingError) -> list[str]:
    """Names of what the restricted unpickler refused, or [] when the error is not a refusal.

    Every unlisted global in the file when the file can be read statically, else the one type or
    function torch's error message names."""
    message = str(error)
    refused = [m.group(1) for m in (re.search(p, message, re.MULTILINE) for p in _REFUSAL_PATTERNS) if m]
    if not refused:
        return []
    try:
        unlisted = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
        unlisted = []
    return unlisted or refused[:1]


def _first_line(error: Exception) -> str:
    """`Type: first line of the message`, for one-line errors."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _validate(checkpoint: object, path: Path) -> dict:
    """Check that what was unpickled has the structure nnU-Net's predictor relies on."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (missing {', '.join(missing)})")
    weights = checkpoint["network_weights"]
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (network_weights is not a state dict of tensors)")
    if not isinstance(checkpoint["trainer_name"], str):
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (trainer_name is not a string)")
    init_args = checkpoint["init_args"]
    if not isinstance(init_args, Mapping) or "configuration" not in init_args:
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (init_args lacks the configuration name)")
    return dict(checkpoint)


def load_checkpoint(path: str | os.PathLike, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> dict:
    """Load an nnU-Net v2 checkpoint (`checkpoint_final.pth`, ...) without executing code from it.

    Only tensors, plain containers and `nnunet_safe_globals()` are unpickled; a file naming any other
    type or function raises `CheckpointError` naming it, before any of it runs. With `trust=True`
    such a file is fully unpickled instead (only for files from a source you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(nnunet_safe_globals()):
            try:
                checkpoint = torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as error:
                offending = _offending_types(path, error)
                if not offending:
                    raise
                if not trust:
                    raise CheckpointError(
                        f"{path}: refusing to unpickle {', '.join(offending)}: not among the types nnU-Net "
                        "checkpoints contain, and unpickling other types can run code; load it only if you "
                        f"trust its source, with {TRUST_FLAG}"
                    ) from None
                checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except CheckpointError:
        raise
    except Exception as error:  # corrupt or foreign file: torch and pickle raise many different types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
    return _validate(checkpoint, path)
