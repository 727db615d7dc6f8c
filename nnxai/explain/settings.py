"""What a run is asked to do: the settings that determine its maps (recorded in run.json) and the compute options
that only change how fast they come."""
from __future__ import annotations

from dataclasses import dataclass

from nnxai.attribution.base import Attribution
from nnxai.attribution.engine import GradientEngine
from nnxai.attribution.gradcampp import GradCAMPlusPlus
from nnxai.attribution.smoothgrad import Sampling, SmoothGrad

ATTRIBUTIONS: dict[str, type[Attribution]] = {method.name: method for method in (SmoothGrad, GradCAMPlusPlus)}
METHODS = tuple(ATTRIBUTIONS)  # in the order explain computes them and lays out their columns
DEFAULT_MAX_MAPS = 8  # SmoothGrad maps held at once; see smoothgrad_maps


@dataclass(frozen=True)
class ExplainSettings:
    """Everything that determines the maps of a run (recorded in run.json)."""

    methods: tuple[str, ...] = ("smoothgrad",)
    samples: int | str = 50  # or "auto": until each map converged (tol, max_samples)
    noise: float = 0.05
    noise_channel: int | None = None  # its range sets the noise sigma; None: FLAIR by name (resolved before the record)
    aggregation: str = "mean"
    tol: float = 0.05
    max_samples: int = 200
    antithetic: bool | None = None  # noise in +/- pairs; None: with --samples auto only (resolved before the record)
    layer: str | None = None  # Grad-CAM++ layer; None: the last decoder stage (resolved before the run record)
    gradcampp_variant: str = "monai"
    normalize: bool = False
    amp: str | None = None
    threshold: float = 0.5
    min_size: int = 1
    connectivity: int = 18
    rule: str = "any"
    iou_threshold: float = 0.25
    seed: int = 0
    step_size: float = 0.5
    use_mirroring: bool = True
    lesion_label: int = 1

    @property
    def method(self) -> str:
        """The first method (runs with one method)."""
        return self.methods[0]

    @property
    def noise_range_channel(self) -> int:
        """The channel whose range sets the noise sigma (runs recorded before it was found by name used channel 0)."""
        return 0 if self.noise_channel is None else self.noise_channel

    def sampling(self) -> Sampling:
        auto = self.samples == "auto"
        return Sampling(None if auto else int(self.samples), self.tol, self.max_samples,
                        antithetic=auto if self.antithetic is None else self.antithetic)

    def attribution(self, method: str, stream: str) -> Attribution:
        """Method `method` set up as these settings ask, with `stream` (the case) naming the noise stream."""
        if method == SmoothGrad.name:
            return SmoothGrad(self.sampling(), self.noise, self.seed, stream, self.lesion_label, self.aggregation,
                              self.noise_range_channel)
        return GradCAMPlusPlus(self.layer, self.gradcampp_variant, self.normalize, self.lesion_label)

    def attributions(self, stream: str) -> list[Attribution]:
        """The run's methods, in the order explain computes them."""
        return [self.attribution(method, stream) for method in METHODS if method in self.methods]


@dataclass(frozen=True)
class ComputeOptions:
    """How gradients are computed (see GradientEngine): the maps do not depend on it beyond float rounding, so a
    run may resume with other values."""

    backward: str = "auto"
    max_batch: int = 16
    memory_budget_mb: float | None = None
    max_maps: int | None = DEFAULT_MAX_MAPS

    def engine(self, amp: str | None) -> GradientEngine:
        return GradientEngine(self.backward, self.max_batch, amp, self.memory_budget_mb, self.max_maps)
