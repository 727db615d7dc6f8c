"""Per-lesion uncertainty of a fold ensemble, beside the saliency (issue 17, item 2).

Two numbers per instance, both in the input's own grid (where the instance masks live):

- ``fold_std_probability``: the standard deviation (ddof 0) across folds of each fold's mean lesion
  probability inside the instance; NaN for a single-fold model, where there is no spread to measure;
- ``mean_entropy``: the mean over the instance's voxels of the binary entropy (bits: 0 for a certain voxel,
  1 at probability 0.5) of the ensemble's lesion probability, the one the prediction was thresholded from.

Each fold's probability comes from nnU-Net's own predictor run with that fold alone, with the run's
mirroring, so a fold's number is what `nnUNetv2_predict -f FOLD` would give.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from nnxai.nnunet.geometry import probabilities_in_original_space
from nnxai.nnunet.model import LoadedModel

UNCERTAINTY_COLUMNS = ("fold_std_probability", "mean_entropy")


def binary_entropy(probability: np.ndarray) -> np.ndarray:
    """Entropy in bits of a two-class prediction with lesion probability `probability` (0 at 0 and 1)."""
    p = np.clip(np.asarray(probability, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -(p * np.log2(p)) - (1 - p) * np.log2(1 - p)
    return np.nan_to_num(terms, nan=0.0)


def fold_probabilities(model: LoadedModel, data: torch.Tensor, properties: dict, lesion_label: int,
                       step_size: float = 0.5, use_mirroring: bool = True,
                       device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Each fold's lesion probability in the input's grid; empty for a single-fold model (one more forward
    pass of the whole volume per fold, against the SmoothGrad samples' many)."""
    if len(model.networks) < 2:
        return []
    probabilities = []
    for fold, network in zip(model.folds, model.networks):
        single = replace(model, folds=[fold], networks=[network])
        logits = single.nnunet_logits(data, step_size, use_mirroring, device)
        probabilities.append(probabilities_in_original_space(single, logits, properties)[lesion_label])
    return probabilities


def instance_uncertainty(mask: np.ndarray, probability: np.ndarray,
                         per_fold: Sequence[np.ndarray] = ()) -> dict[str, float]:
    """`UNCERTAINTY_COLUMNS` of one instance (boolean mask) from the ensemble and per-fold probabilities."""
    fold_means = [float(fold[mask].mean()) for fold in per_fold]
    return {"fold_std_probability": float(np.std(fold_means)) if len(fold_means) > 1 else float("nan"),
            "mean_entropy": float(binary_entropy(probability[mask]).mean())}
