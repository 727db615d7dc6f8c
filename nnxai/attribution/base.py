"""The one contract of every attribution method, in the spirit of Captum's `attribute()`.

A method is a class whose constructor takes its own settings and whose `attribute(window, data, masks)` explains
the instances (`masks`, network space) of one preprocessed case through nnU-Net's sliding window, yielding per
instance a `SaliencyMap` of shape (channels, *spatial): one map per input channel (`per_channel`), or a single one
for all channels. Callers (explain, sanity checks, experiments) loop over methods without knowing which they run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from nnxai.attribution.engine import GradientEngine
from nnxai.nnunet.sliding_window import Slices, SlidingWindow

@dataclass
class SaliencyMap:
    """One instance's map in network space, the samples it used and its relative standard error (auto sampling
    only; NaN with a fixed number of samples, which holds no variance map).

    Only the box of the tiles the instance touches can hold gradient, so only that box is kept (`local`, at
    `region` of a volume of `shape`): a cohort's many maps cost memory by their support, not by the volume.
    """

    local: np.ndarray
    region: Slices
    shape: tuple[int, ...]
    samples: int
    relative_standard_error: float

    @property
    def map(self) -> np.ndarray:
        """The whole (C, *spatial) map, zero outside the box."""
        full = np.zeros((self.local.shape[0], *self.shape), dtype=self.local.dtype)
        full[(slice(None), *self.region)] = self.local
        return full

    @classmethod
    def whole(cls, full: np.ndarray) -> SaliencyMap:
        """A (C, *spatial) map kept whole, from a method that draws no noise samples."""
        return cls(full, tuple(slice(0, n) for n in full.shape[1:]), tuple(full.shape[1:]), 0, float("nan"))


class Attribution(ABC):
    """An attribution method: what `attribute` yields and how explain names its columns and files."""

    name: ClassVar[str]  # as `nnxai explain --method` names it
    title: ClassVar[str]  # as figures and the report name it
    per_channel: ClassVar[bool]  # one map per input channel (True) or one for all channels
    sampled: ClassVar[bool]  # maps are means over noise samples (with a sample count and standard error)

    @abstractmethod
    def attribute(self, window: SlidingWindow, data: torch.Tensor, masks: Mapping[int, np.ndarray],
                  engine: GradientEngine | None = None, progress: bool = False
                  ) -> Iterator[tuple[int, SaliencyMap]]:
        """(instance id, its map) for every instance of `masks`, each yielded as soon as it is done."""
