"""Instance-level SmoothGrad: exact gradients, tile-by-tile equals whole-volume, instances independent."""
import numpy as np
import pytest
import torch

from nnxai.attribution.engine import GradientEngine
from nnxai.attribution.smoothgrad import Sampling, instance_smoothgrad, noise_generator, noise_sigma, smoothgrad_maps
from nnxai.nnunet.sliding_window import SlidingWindow
from tests.conftest import tiny_unet
from tests.graph_memory import peak_graph_bytes


def volume_and_masks():
    data = torch.randn(2, 18, 14, 11, generator=torch.Generator().manual_seed(3))
    first = np.zeros((18, 14, 11), bool)
    first[2:5, 3:6, 4:7] = True
    second = np.zeros((18, 14, 11), bool)
    second[12:16, 8:12, 2:4] = True
    return data, {1: first, 7: second}


def whole_volume_gradient(window, data, mask):
    """The study's way: one graph over the whole sliding window, gradient of the summed instance logits."""
    x = data.clone().requires_grad_(True)
    target = (window.logits(x)[1] * torch.as_tensor(mask)).sum()
    (gradient,) = torch.autograd.grad(target, x)
    return gradient.numpy()


def test_zero_noise_equals_plain_gradient_of_sliding_window_target():
    window = SlidingWindow([tiny_unet()], (8, 8, 8), mirror_axes=(0, 2))
    data, masks = volume_and_masks()
    maps = instance_smoothgrad(window, data, masks, samples=1, noise=0.0)
    for instance_id, mask in masks.items():
        expected = whole_volume_gradient(window, data, mask)
        assert maps[instance_id].shape == (2, 18, 14, 11)
        np.testing.assert_allclose(maps[instance_id], expected, rtol=1e-4, atol=1e-6)
        assert np.abs(expected).max() > 0


@pytest.mark.parametrize("shape", [(18, 14, 11), (6, 14, 11)])  # the second is padded on its first axis
def test_only_the_box_of_the_touched_tiles_is_kept(shape):
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4))
    mask = np.zeros(shape, bool)
    mask[1:3, 1:3, 1:3] = True  # in the corner tile only
    result = dict(smoothgrad_maps(window, data, {1: mask}, Sampling(1), noise=0.0))[1]
    full = result.map
    assert full.shape == (2, *shape) and result.local.size < full.size / 2
    np.testing.assert_allclose(full, whole_volume_gradient(window, data, mask), rtol=1e-4, atol=1e-6)
    full[(slice(None), *result.region)] = 0
    assert not full.any()


def test_map_does_not_depend_on_other_instances():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = volume_and_masks()
    together = instance_smoothgrad(window, data, masks, samples=3, generator=torch.Generator().manual_seed(5))
    alone = instance_smoothgrad(window, data, {7: masks[7]}, samples=3, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(together[7], alone[7])


@pytest.mark.parametrize("sampling", [Sampling(3), Sampling(None, tol=0.3, min_samples=2, max_samples=6)])
def test_instances_explained_in_groups_get_the_same_maps(sampling):
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = volume_and_masks()
    masks[4] = np.roll(masks[1], 5, axis=0)

    def explain(max_maps):
        return smoothgrad_maps(window, data, masks, sampling, 0.1, torch.Generator().manual_seed(5),
                               engine=GradientEngine(max_maps=max_maps))

    together, grouped = dict(explain(None)), dict(explain(1))
    assert list(grouped) == list(together) == [1, 7, 4]
    for instance_id, result in together.items():
        np.testing.assert_array_equal(grouped[instance_id].map, result.map)
        assert grouped[instance_id].samples == result.samples


def test_mean_over_samples_with_shared_noise():
    """With noise, the map is the mean of plain gradients at the noisy inputs drawn from the generator."""
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = volume_and_masks()
    maps = instance_smoothgrad(window, data, masks, samples=2, noise=0.1, generator=torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    sigma = noise_sigma(data, 0.1)
    noisy = [data + torch.randn(data.shape, generator=generator) * sigma for _ in range(2)]
    for instance_id, mask in masks.items():
        expected = np.mean([whole_volume_gradient(window, x, mask) for x in noisy], axis=0)
        np.testing.assert_allclose(maps[instance_id], expected, rtol=1e-4, atol=1e-6)


def test_noise_sigma_uses_flair_range():
    data = torch.zeros(2, 4, 4, 4)
    data[0, 0, 0, 0], data[0, 1, 1, 1] = -1.0, 3.0
    data[1] = 100.0
    assert noise_sigma(data, 0.05) == pytest.approx(0.2)
    data[1, 2, 2, 2] = 80.0
    assert noise_sigma(data, 0.05, channel=1) == pytest.approx(1.0)  # FLAIR as the second channel


def test_noise_stream_depends_on_case_and_seed_only():
    a = torch.randn(5, generator=noise_generator(0, "case_001"))
    b = torch.randn(5, generator=noise_generator(0, "case_001"))
    c = torch.randn(5, generator=noise_generator(0, "case_002"))
    d = torch.randn(5, generator=noise_generator(1, "case_001"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_instance_outside_every_tile_gets_zero_map():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, _ = volume_and_masks()
    maps = instance_smoothgrad(window, data, {3: np.zeros((18, 14, 11), bool)}, samples=1, noise=0.0)
    assert not maps[3].any()


class _RecordCudnn(torch.autograd.Function):
    """Identity that records cuDNN's TF32 and algorithm-search switches in its forward and its backward pass."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        _RecordCudnn.seen.append(("forward", torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _RecordCudnn.seen.append(("backward", torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark))
        return grad


@pytest.mark.parametrize("amp, tf32_in_forward, search", [(None, False, True), ("bf16", True, True),
                                                          (None, False, False)])
def test_cudnn_switches_in_gradient_passes(monkeypatch, amp, tf32_in_forward, search):
    """Float32 maps are float32 on CUDA (TF32 off in the forward and backward passes), cuDNN's algorithm search
    follows the engine in both, and both switches are restored after."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not search)
    monkeypatch.setattr(_RecordCudnn, "seen", [])
    engine = GradientEngine("loop", amp=amp, cudnn_search=search)
    x = torch.ones(3, requires_grad=True)
    with engine.forward_pass(torch.device("cpu")):
        y = _RecordCudnn.apply(x)
    engine.gradients(y, [x], torch.eye(3))
    assert _RecordCudnn.seen == [("forward", tf32_in_forward, search)] + [("backward", False, search)] * 3
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.backends.cudnn.benchmark is (not search)


def test_folds_and_mirrorings_are_differentiated_one_pass_at_a_time():
    """2 folds x 8 mirrorings: the maps still equal the whole-volume gradient of the ensemble's target, and the
    graphs held at once are one network pass's, not the 16 passes' of a tile."""
    data = torch.randn(2, 10, 9, 8, generator=torch.Generator().manual_seed(4))
    masks = {1: np.zeros((10, 9, 8), bool)}
    masks[1][2:5, 3:6, 4:7] = True
    ensemble = SlidingWindow([tiny_unet(0), tiny_unet(1)], (8, 8, 8), mirror_axes=(0, 1, 2))
    single = SlidingWindow([tiny_unet(0)], (8, 8, 8))
    peaks, maps = {}, {}
    for name, window in (("ensemble", ensemble), ("single", single)):
        with peak_graph_bytes() as peak:
            maps[name] = instance_smoothgrad(window, data, masks, samples=1, noise=0.0)
        peaks[name] = peak[0]
    for instance_id, mask in masks.items():
        np.testing.assert_allclose(maps["ensemble"][instance_id], whole_volume_gradient(ensemble, data, mask),
                                   rtol=1e-4, atol=1e-6)
    assert len(ensemble.passes) == 16
    assert 0 < peaks["ensemble"] < 1.2 * peaks["single"]
