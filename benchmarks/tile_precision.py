"""What one tile's forward and backward pass cost under each precision and memory layout (issue 4, item 3).

Instance SmoothGrad is one forward per tile and one backward per instance and tile, so the cost of a single
tile's passes bounds what any schedule can reach. This times, for the benchmark's network on one patch of
random input: float32 (TF32 off and on), bf16 and fp16 autocast, each with contiguous and channels-last
tensors, with cuDNN's algorithm search on. The target is the lesion logits summed over a central cube, as
an instance's; the relative L2 error of the input gradient against float32 (TF32 off) is printed beside.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import click
import torch

from benchmarks.explain_benchmark import cpu_plan_network, integers
from nnxai.attribution.engine import AMP_DTYPES

PRECISIONS = ("fp32", "tf32", *AMP_DTYPES)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(network: torch.nn.Module, tile: torch.Tensor, mask: torch.Tensor, precision: str,
                 channels_last: bool, repeats: int) -> dict:
    """Mean seconds of the forward and of the backward pass, and the input gradient of the last repeat."""
    device = tile.device
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    network = network.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    forward_seconds, backward_seconds = [], []
    for repeat in range(repeats + 2):  # two untimed warm-ups (cuDNN's algorithm search)
        x = tile.clone().requires_grad_(True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        _synchronize(device)
        start = time.perf_counter()
        autocast = (torch.autocast(device.type, dtype=AMP_DTYPES[precision]) if precision in AMP_DTYPES
                    else contextlib.nullcontext())
        with autocast:
            target = (network(x)[0, 1].float() * mask).sum()
        _synchronize(device)
        middle = time.perf_counter()
        (gradient,) = torch.autograd.grad(target, x)
        _synchronize(device)
        if repeat >= 2:
            forward_seconds.append(middle - start)
            backward_seconds.append(time.perf_counter() - middle)
    return {"forward_s": sum(forward_seconds) / repeats, "backward_s": sum(backward_seconds) / repeats,
            "gradient": gradient.detach().float().contiguous()}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--features", default="32,64,128,256,320,320", show_default=True)
@click.option("--convs", default=2, show_default=True)
@click.option("--patch", default=128, show_default=True)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the figures as JSON.")
def main(features: str, convs: int, patch: int, device: str, repeats: int, json_path: Path | None) -> None:
    """Time one tile's forward and backward pass per precision and memory layout."""
    device = torch.device(device)
    torch.backends.cudnn.benchmark = True
    network = cpu_plan_network(integers(features), convs, (patch,) * 3, 0).to(device)
    tile = torch.randn((1, 2) + (patch,) * 3, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.zeros((patch,) * 3, device=device)
    quarter = patch // 4
    mask[quarter:-quarter, quarter:-quarter, quarter:-quarter] = 1
    rows, reference = [], None
    for precision in PRECISIONS:
        for channels_last in (False, True):
            result = time_variant(network, tile, mask, precision, channels_last, repeats)
            gradient = result.pop("gradient")
            if reference is None:
                reference = gradient
            result["gradient_rel_l2"] = float((gradient - reference).norm() / reference.norm())
            rows.append({"precision": precision, "channels_last": channels_last, **result})
            print(f"{precision:5s} {'channels-last' if channels_last else 'contiguous':13s} forward "
                  f"{result['forward_s'] * 1e3:8.1f} ms  backward {result['backward_s'] * 1e3:8.1f} ms  "
                  f"gradient rel. L2 vs fp32 {result['gradient_rel_l2']:.2e}", flush=True)
    if json_path:
        json_path.write_text(json.dumps({"device": str(device), "patch": patch, "features": features,
                                         "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
