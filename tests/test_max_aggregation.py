"""Max aggregation and the gradient engine: batched backward passes equal a one-voxel-at-a-time loop."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from nnxai.attribution import engine as gradient_engine
from nnxai.attribution.engine import GradientEngine, GradientError
from nnxai.attribution.smoothgrad import Sampling, noise_sigma, smoothgrad_maps
from nnxai.cli import main
from nnxai.nnunet.sliding_window import SlidingWindow
from tests.conftest import tiny_unet
from tests.fake_model import write_case, write_model_folder
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

SHAPE = (12, 10, 9)  # 2 x 2 x 2 tiles of 8^3


def small_case():
    data = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    first = np.zeros(SHAPE, bool)
    first[2:4, 3:5, 3] = True  # 4 voxels in one corner tile
    second = np.zeros(SHAPE, bool)
    second[5:7, 5, 4:6] = True  # 4 voxels spread over all tiles
    second[9, 7, 6] = True
    return data, {1: first, 2: second}


def one_voxel_at_a_time(window, noisy_inputs, mask):
    """Reference: for each sample, each voxel's own full-volume gradient; signed largest magnitude; mean."""
    maps = []
    for x in noisy_inputs:
        x = x.clone().requires_grad_(True)
        logits = window.logits(x)[1]
        per_voxel = np.stack([torch.autograd.grad(logits[tuple(v)], x, retain_graph=True)[0].numpy()
                              for v in np.argwhere(mask)])
        largest = np.abs(per_voxel).argmax(axis=0)
        maps.append(np.take_along_axis(per_voxel, largest[None], axis=0)[0])
    return np.mean(maps, axis=0)


@pytest.mark.parametrize("backward, mirror_axes, samples", [("loop", (1,), 2), ("batched", None, 2)])
def test_max_aggregation_equals_one_voxel_at_a_time_loop(backward, mirror_axes, samples):
    window = SlidingWindow([tiny_unet()], (8, 8, 8), mirror_axes=mirror_axes)
    data, masks = small_case()
    engine = GradientEngine(backward=backward, max_batch=3)  # several batches per voxel group
    maps = dict(smoothgrad_maps(window, data, masks, Sampling(samples), noise=0.1,
                                generator=torch.Generator().manual_seed(1), aggregation="max", engine=engine))
    generator = torch.Generator().manual_seed(1)
    sigma = noise_sigma(data, 0.1)
    noisy = [data + torch.randn(data.shape, generator=generator) * sigma for _ in range(samples)]
    for instance_id, mask in masks.items():
        expected = one_voxel_at_a_time(window, noisy, mask)
        assert maps[instance_id].samples == samples
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(maps[instance_id].map, expected, rtol=1e-4, atol=1e-6)


def test_max_of_single_voxel_instance_is_its_mean_map():
    """With one voxel, the largest-magnitude value over the instance is that voxel's gradient itself."""
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, _ = small_case()
    mask = np.zeros(SHAPE, bool)
    mask[7, 5, 4] = True
    mean = dict(smoothgrad_maps(window, data, {1: mask}, Sampling(1), noise=0.0, aggregation="mean"))[1].map
    largest = dict(smoothgrad_maps(window, data, {1: mask}, Sampling(1), noise=0.0, aggregation="max"))[1].map
    np.testing.assert_allclose(largest, mean, rtol=1e-5, atol=1e-8)


def test_batched_mean_aggregation_equals_loop():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = small_case()
    kwargs = dict(sampling=Sampling(1), noise=0.05, aggregation="mean")
    loop = dict(smoothgrad_maps(window, data, masks, generator=torch.Generator().manual_seed(2),
                                engine=GradientEngine("loop"), **kwargs))
    batched = dict(smoothgrad_maps(window, data, masks, generator=torch.Generator().manual_seed(2),
                                   engine=GradientEngine("batched", max_batch=1), **kwargs))
    for instance_id in masks:
        np.testing.assert_allclose(batched[instance_id].map, loop[instance_id].map, rtol=1e-5, atol=1e-8)


def test_auto_backward_measures_both_and_keeps_the_faster():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = small_case()
    engine = GradientEngine("auto")
    auto = dict(smoothgrad_maps(window, data, masks, Sampling(1), noise=0.0, engine=engine))
    loop = dict(smoothgrad_maps(window, data, masks, Sampling(1), noise=0.0, engine=GradientEngine("loop")))
    assert set(engine.timings) == {"loop", "batched"}
    batched_pays = engine.timings["batched"] <= 0.9 * engine.timings["loop"]
    assert engine.chosen == ("batched" if batched_pays else "loop")
    for instance_id in masks:
        np.testing.assert_allclose(auto[instance_id].map, loop[instance_id].map, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("failure,escapes", [
    (RuntimeError("Batching rule not implemented for aten::weird_op"), False),
    (RuntimeError("vmap: calling .item() on a Tensor is not supported"), False),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
])
def test_auto_backward_falls_back_only_when_batching_is_unsupported(monkeypatch, failure, escapes):
    """A network vmap cannot batch runs looping; out of memory and other real errors stop the run."""
    def batched(*_args):
        raise failure
    monkeypatch.setattr(gradient_engine, "_batched", batched)
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = small_case()
    engine = GradientEngine("auto")

    def run():
        return dict(smoothgrad_maps(window, data, masks, Sampling(1), noise=0.0, engine=engine))
    if escapes:
        with pytest.raises(type(failure), match=str(failure)[:20]):
            run()
        assert engine.chosen is None
    else:
        run()
        assert engine.chosen == "loop" and engine.timings["batched"] == float("inf")


def test_memory_budget_bounds_the_batch():
    mb = 2 ** 20
    assert GradientEngine("loop", max_batch=16, memory_budget_mb=3).batch_size(mb, mb // 2) == 4
    assert GradientEngine("loop", max_batch=2, memory_budget_mb=3).batch_size(mb, mb // 2) == 2
    assert GradientEngine("batched", max_batch=16, memory_budget_mb=3).batch_size(mb, mb // 2) == 1
    assert GradientEngine("loop", max_batch=16).batch_size(10 ** 12, 10 ** 12) == 16  # no budget, no bound


def test_memory_budget_smaller_than_one_tile_is_a_clear_error():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = small_case()
    engine = GradientEngine("loop", memory_budget_mb=0.01)
    with pytest.raises(GradientError, match=r"memory budget 0.01 MB is too small for one tile \(.* need about"):
        dict(smoothgrad_maps(window, data, masks, Sampling(1), noise=0.0, aggregation="max", engine=engine))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_maps_stay_close_to_float32(amp):
    """Autocast runs on the CPU too, so the AMP code path (and fp16 gradient scaling) is checked here."""
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = small_case()
    reference = dict(smoothgrad_maps(window, data, {2: masks[2]}, Sampling(1), noise=0.0))[2].map
    mixed = dict(smoothgrad_maps(window, data, {2: masks[2]}, Sampling(1), noise=0.0,
                                 engine=GradientEngine(amp=amp)))[2].map
    # bf16 keeps 8 mantissa bits, fp16 11: a few percent of the map's norm, never exact
    assert 0 < np.linalg.norm(mixed - reference) < 0.1 * np.linalg.norm(reference)


def test_explain_with_max_aggregation_and_a_too_small_memory_budget(tmp_path):
    write_model_folder(tmp_path / "model")
    write_case(tmp_path / "images", "case_0", seed=0)
    base = ["explain", "-i", str(tmp_path / "images"), "-m", str(tmp_path / "model"), "--aggregation", "max",
            "--samples", "1", "--disable_tta", "-device", "cpu", "--backward", "batched", "--max-batch", "64"]
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "instances.csv")
    assert len(table) == 2 and (table.smoothgrad_FLAIR_peak_pos > 0).all() and (table.smoothgrad_samples == 1).all()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["settings"]["aggregation"] == "max"
    result = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "small"), "--memory-budget", "0.05"])
    assert result.exit_code == 1
    assert "Error: case_0: memory budget 0.05 MB is too small for one tile" in result.output
    assert not (tmp_path / "small" / "case_0").exists()
