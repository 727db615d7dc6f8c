"""The differentiable sliding window reproduces nnU-Net's own prediction and has correct gradients."""
import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnxai.nnunet.sliding_window import SlidingWindow
from tests.conftest import tiny_unet


def nnunet_logits(network, data, patch, mirror_axes, step=0.5):
    """nnU-Net's own sliding-window logits for a network (fp16 accumulation, inference mode)."""
    predictor = nnUNetPredictor(tile_step_size=step, use_mirroring=mirror_axes is not None,
                                device=torch.device("cpu"), allow_tqdm=False)

    class Config:
        patch_size = patch

    class Labels:
        num_segmentation_heads = 2

    predictor.network = network
    predictor.configuration_manager = Config()
    predictor.label_manager = Labels()
    predictor.allowed_mirroring_axes = mirror_axes
    return predictor.predict_sliding_window_return_logits(data).float()


@pytest.mark.parametrize("mirror_axes", [None, (0, 1, 2)])
def test_logits_match_nnunet_predictor(mirror_axes):
    network = tiny_unet()
    data = torch.randn(2, 20, 27, 13, generator=torch.Generator().manual_seed(1))
    patch = (12, 16, 16)  # smaller than the volume on two axes, larger (padding) on the third
    with torch.no_grad():
        ours = SlidingWindow([network], patch, mirror_axes=mirror_axes).logits(data)
    theirs = nnunet_logits(network, data, patch, mirror_axes)
    assert ours.shape == theirs.shape == (2, 20, 27, 13)
    # nnU-Net accumulates in float16, which loses precision where the Gaussian weights are tiny (tile
    # borders, up to ~0.5 there); everywhere else the two agree to float16 precision.
    difference = (ours - theirs).abs().flatten()
    assert float(difference.max()) < 0.6
    assert float(difference.quantile(0.95)) < 5e-3


def test_tiles_and_normalizer_cover_volume():
    window = SlidingWindow([tiny_unet()], (8, 8, 8), step_size=0.5)
    layout = window.layout((20, 8, 5))
    assert layout.padded_shape == (20, 8, 8)
    starts = sorted({t[0].start for t in layout.tiles})
    assert starts == [0, 4, 8, 12]  # nnU-Net's evenly spaced steps for 20 voxels, patch 8, step 0.5
    assert len(layout.tiles) == 4
    assert bool((layout.normalizer > 0).all())
    blended_weight = torch.zeros(layout.padded_shape)
    for tile in layout.tiles:
        blended_weight[tile] += layout.tile_weight(tile)
    assert torch.allclose(blended_weight, torch.ones_like(blended_weight), atol=1e-6)


def test_ensemble_is_mean_of_fold_logits():
    data = torch.randn(2, 10, 10, 10, generator=torch.Generator().manual_seed(2))
    a, b = tiny_unet(seed=1), tiny_unet(seed=2)
    patch = (8, 8, 8)
    both = SlidingWindow([a, b], patch).logits(data)
    mean = (SlidingWindow([a], patch).logits(data) + SlidingWindow([b], patch).logits(data)) / 2
    assert torch.allclose(both, mean, atol=1e-5)


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    network = tiny_unet().double()
    window = SlidingWindow([network], (8, 8, 8), mirror_axes=(0,))
    data = torch.randn(2, 12, 9, 8, dtype=torch.float64)
    mask = torch.zeros(12, 9, 8, dtype=torch.float64)
    mask[5:8, 3:6, 2:5] = 1

    def target(x):
        layout_logits = window.logits(x)
        return (layout_logits[1] * mask).sum()

    x = data.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target(x), x)
    rng = np.random.default_rng(0)
    for _ in range(6):
        index = (int(rng.integers(2)), *(int(rng.integers(s)) for s in data.shape[1:]))
        step = 1e-6
        plus, minus = data.clone(), data.clone()
        plus[index] += step
        minus[index] -= step
        with torch.no_grad():
            numeric = (target(plus) - target(minus)) / (2 * step)
        assert abs(float(numeric) - float(grad[index])) <= 1e-6 + 1e-5 * abs(float(numeric))


def test_cache_predicts_each_tile_once_and_changes_nothing():
    network = tiny_unet()
    calls = []
    network.register_forward_hook(lambda module, inputs, output: calls.append(1))
    window = SlidingWindow([network], (8, 8, 8))
    data = torch.randn(2, 20, 12, 9, generator=torch.Generator().manual_seed(4))
    layout = window.layout(data.shape[1:])
    cache = {}
    with torch.no_grad():
        first = window.logits(data, layout.tiles[:2], layout, cache)
        assert len(calls) == 2
        both = window.logits(data, layout.tiles[:3], layout, cache)
        assert len(calls) == 3  # only the new tile ran
        torch.testing.assert_close(first, window.logits(data, layout.tiles[:2], layout), rtol=0, atol=0)
        torch.testing.assert_close(both, window.logits(data, layout.tiles[:3], layout), rtol=0, atol=0)
