"""Options that several commands share, defined once."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import click
import torch

from nnxai.lesions.instances import CONNECTIVITIES, MATCHING_RULES

trust_model_option = click.option(
    "--trust-model", "--trust-checkpoint", "trust_checkpoint", is_flag=True,
    help="Trust this model folder: unpickle any checkpoint content and build whatever classes its plans.json "
         "names (both can run code: only for models from a source you trust).")


def option_group(*options: Callable) -> Callable:
    """One decorator for several options that commands share, applied as if stacked in the order given."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def resolve_device(name: str | None) -> str:
    """The torch device asked for (None: cuda if available, else cpu), refusing one this machine does not have."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("-device cuda: no CUDA GPU is available here (use -device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise click.ClickException("-device mps: Apple MPS is not available here (use -device cpu)")
    return name


device_option = click.option(
    "-device", "--device", "device", type=click.Choice(["cpu", "cuda", "mps"]), default=None,
    callback=lambda _ctx, _param, value: resolve_device(value), show_default="cuda if available, else cpu",
    help="Torch device for prediction and gradients.")


def instance_options(defaults: Mapping[str, object] | None = None, unset: str = "") -> Callable:
    """--min-size, --connectivity, --rule and --iou-threshold: how predicted voxels become lesion instances and how
    these match the ground truth. With `defaults` (by parameter name) those are shown as the defaults; an option
    without one is None when left out, and `unset` says what applies then."""
    defaults = defaults or {}
    suffix = f" [default: {unset}]" if unset else ""

    def default(name: str) -> dict:
        return {"default": defaults[name], "show_default": True} if name in defaults else {"default": None}

    options = (
        click.option("--min-size", type=click.IntRange(min=1), **default("min_size"),
                     help=f"Drop predicted components with fewer voxels (the study: 6).{suffix}"),
        click.option("--connectivity", type=click.Choice([str(c) for c in CONNECTIVITIES]),
                     callback=lambda _ctx, _param, value: None if value is None else int(value),
                     **default("connectivity"),
                     help=f"Voxel connectivity of connected components (the study: 18).{suffix}"),
        click.option("--rule", type=click.Choice(MATCHING_RULES), **default("rule"),
                     help=f"Matching: any overlap (the study) or IoU >= --iou-threshold.{suffix}"),
        click.option("--iou-threshold", type=click.FloatRange(0, 1, min_open=True), **default("iou_threshold"),
                     help=f"IoU needed for a match with --rule iou.{suffix}"),
    )
    return option_group(*options)
