"""Instance-level Grad-CAM++: the formula against the paper's equations, tiling/blending against a whole-volume
reference, hooks on real nnU-Net blocks, layer errors, `nnxai layers` and `nnxai explain --method gradcampp`."""
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from nnxai.attribution.engine import GradientEngine
from nnxai.attribution.gradcampp import (LayerError, _groups, check_layer, default_layer, gradcampp_map,
                                         instance_gradcampp, valid_layers)
from nnxai.cli import main
from nnxai.nnunet.sliding_window import SlidingWindow
from tests.conftest import tiny_unet
from tests.fake_model import write_case, write_model_folder
from tests.graph_memory import peak_graph_bytes
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)


def paper_gradcampp(activations, d_score, score, variant):
    """Grad-CAM++ from Chattopadhay et al. (2018) with Y = exp(S), written out channel by channel.

    dY/dA = e^S dS, d2Y/dA2 = e^S dS^2, d3Y/dA3 = e^S dS^3 (Eq. 17-18); alpha per Eq. 19 ("paper": the
    third derivative at the pixel times the summed activations) or as MONAI sums them ("monai"); weights
    sum alpha * relu(dY/dA); map relu(sum_k w_k A_k). Divided by e^S, the factor MONAI keeps.
    """
    y = np.exp(score)
    first, second, third = y * d_score, y * d_score ** 2, y * d_score ** 3
    saliency = np.zeros(activations.shape[1:])
    for k in range(activations.shape[0]):
        a = activations[k]
        if variant == "monai":
            denominator = 2 * second[k] + np.sum(a * third[k])
        else:
            denominator = 2 * second[k] + np.sum(a) * third[k]
        alpha = np.divide(second[k], denominator, out=np.zeros_like(a), where=denominator != 0)
        saliency += np.sum(alpha * np.maximum(first[k], 0)) * a
    return np.maximum(saliency, 0) / y


@pytest.mark.parametrize("variant", ["monai", "paper"])
def test_formula_matches_the_papers_equations(variant):
    rng = np.random.default_rng(0)
    activations = rng.normal(0.5, 1, (5, 6, 7, 4))
    gradients = rng.normal(0, 0.3, (5, 6, 7, 4))
    ours = gradcampp_map(torch.from_numpy(activations), torch.from_numpy(gradients), variant).numpy()
    expected = paper_gradcampp(activations, gradients, score=0.7, variant=variant)
    assert expected.max() > 0 and (expected == 0).any()  # the final ReLU is exercised
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_the_two_variants_differ():
    rng = np.random.default_rng(1)
    activations, gradients = (torch.from_numpy(rng.normal(0.5, 1, (3, 5, 5, 5))) for _ in range(2))
    monai, paper = (gradcampp_map(activations, gradients, variant) for variant in ("monai", "paper"))
    assert not torch.allclose(monai, paper)


class WithInputLayer(nn.Module):
    """A tiny U-Net behind an identity layer, so the hooked activations are the input itself, plus a module
    that never runs."""

    def __init__(self, seed):
        super().__init__()
        self.input_layer = nn.Identity()
        self.unet = tiny_unet(seed)
        self.unused = nn.Conv3d(2, 2, 1)

    def forward(self, x):
        return self.unet(self.input_layer(x))


def masks_for(shape):
    first = np.zeros(shape, bool)
    first[2:5, 3:6, 1:4] = True
    second = np.zeros(shape, bool)
    second[9:12, 8:11, 3:5] = True
    return {1: first, 4: second}


def test_tiles_flips_and_folds_match_the_whole_volume_reference():
    """At a layer that is the input, blended activations are the input and summed tile gradients are the
    plain gradient of the whole-volume target: so the map must equal the formula applied to those, per fold,
    averaged over folds, through padding (third axis smaller than the patch), overlapping tiles and TTA."""
    shape, patch, mirror = (13, 12, 6), (8, 8, 8), (0, 2)
    data = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    networks = [WithInputLayer(0).eval(), WithInputLayer(1).eval()]
    masks = masks_for(shape)
    window = SlidingWindow(networks, patch, mirror_axes=mirror)
    assert len(window.layout(shape).tiles) == 6  # 3 x 2 x 1, overlapping
    maps = instance_gradcampp(window, data, masks, layer="input_layer")
    per_fold = {instance_id: [] for instance_id in masks}
    for network in networks:
        x = data.clone().requires_grad_(True)
        lesion_logits = SlidingWindow([network], patch, mirror_axes=mirror).logits(x)[1]
        for instance_id, mask in masks.items():
            (gradient,) = torch.autograd.grad((lesion_logits * torch.as_tensor(mask)).sum(), x, retain_graph=True)
            per_fold[instance_id].append(paper_gradcampp(data.numpy(), gradient.numpy(), 0.0, "monai"))
    for instance_id in masks:
        expected = np.mean(per_fold[instance_id], axis=0)
        assert maps[instance_id].shape == shape and expected.max() > 0
        # tile-summed and whole-volume gradients differ by float32 rounding (~1e-7), which alpha's nearly
        # cancelling denominator (2 g^2 + sum A g^3) amplifies to ~5e-3 at a few voxels; a wrong tile, flip
        # or weight is off by order one
        np.testing.assert_allclose(maps[instance_id], expected, rtol=1e-2, atol=1e-4 * expected.max())


@pytest.mark.parametrize("layer", [None, "encoder.stages.1"])
def test_hooked_nnunet_block_in_one_tile_matches_direct_hook(layer):
    """A volume of one patch: the map equals Grad-CAM++ computed with a hook on the network run directly,
    upsampled trilinearly for the half-resolution encoder stage."""
    network = tiny_unet(3)
    data = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = np.zeros((8, 8, 8), bool)
    mask[2:5, 3:6, 2:4] = True
    name = layer or "decoder.stages.0"
    captured = []
    handle = network.get_submodule(name).register_forward_hook(lambda _m, _i, out: captured.append(out))
    logits = network(data[None])
    handle.remove()
    (gradient,) = torch.autograd.grad((logits[0, 1] * torch.as_tensor(mask)).sum(), captured[0])
    expected = torch.from_numpy(paper_gradcampp(captured[0][0].detach().numpy(), gradient[0].numpy(), 0.0, "monai"))
    if expected.shape != (8, 8, 8):
        expected = F.interpolate(expected[None, None].float(), size=(8, 8, 8), mode="trilinear",
                                 align_corners=False)[0, 0]
    ours = instance_gradcampp(SlidingWindow([network], (8, 8, 8)), data, {1: mask}, layer=layer)[1]
    assert expected.max() > 0
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-6 * float(expected.max()))


class InstanceScore(nn.Module):
    """A segmentation network as a classifier for MONAI: class 1 scores the instance's summed lesion logits,
    shifted by `offset` so that MONAI's exp(score) factor is exp(0) = 1."""

    def __init__(self, network, mask):
        super().__init__()
        self.network = network
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32))
        self.offset = 0.0

    def forward(self, x):
        lesion = (self.network(x)[:, 1] * self.mask).sum(dim=(1, 2, 3)) - self.offset
        return torch.stack([torch.zeros_like(lesion), lesion], dim=1)


def test_monai_gradcampp_gives_the_same_raw_map_in_one_tile():
    from monai.visualize import GradCAMpp

    network = tiny_unet(3)
    data = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = np.zeros((8, 8, 8), bool)
    mask[2:5, 3:6, 2:4] = True
    classifier = InstanceScore(network, mask)
    with torch.no_grad():
        classifier.offset = float(classifier(data[None])[0, 1])
    theirs = GradCAMpp(classifier, target_layers="network.decoder.stages.0").compute_map(data[None], class_idx=1)
    ours = instance_gradcampp(SlidingWindow([network], (8, 8, 8)), data, {1: mask})[1]
    assert ours.max() > 0
    # MONAI adds 1e-7 to alpha's denominator; otherwise the raw maps are the same
    np.testing.assert_allclose(ours, theirs[0, 0].detach().numpy(), rtol=1e-4, atol=1e-5 * ours.max())


def test_map_is_independent_of_other_instances_and_normalizes_to_unit_range():
    shape = (13, 12, 6)
    data = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    masks = masks_for(shape)
    together = instance_gradcampp(window, data, masks)
    alone = instance_gradcampp(window, data, {4: masks[4]})
    np.testing.assert_allclose(together[4], alone[4], rtol=1e-5, atol=1e-9)
    normalized = instance_gradcampp(window, data, {4: masks[4]}, normalize=True)[4]
    assert normalized.min() == 0 and normalized.max() == pytest.approx(1)
    np.testing.assert_allclose(normalized, alone[4] / alone[4].max(), rtol=1e-5, atol=1e-6)  # min of a ReLU map is 0


def test_valid_layers_have_channels_and_stride():
    layers = {info.name: info for info in valid_layers(tiny_unet(), (8, 8, 8), 2)}
    assert default_layer(tiny_unet()) == "decoder.stages.0"
    assert (layers["decoder.stages.0"].channels, layers["decoder.stages.0"].stride) == (4, (1, 1, 1))
    assert (layers["encoder.stages.1"].channels, layers["encoder.stages.1"].stride) == (8, (2, 2, 2))
    assert "encoder.stages.0.0.convs.0.norm" not in layers and "encoder" not in layers


@pytest.mark.parametrize("name, reason", [
    ("nope", "unknown layer 'nope'"),
    ("unet.encoder.stages.0.0.convs.0.norm", "modified in place by the next operation"),
    ("unet.encoder", "its output is a list, not a tensor"),
    ("unused", "does not run in the network's forward pass"),
])
def test_unusable_layers_are_refused_with_the_reason_and_the_valid_names(name, reason):
    with pytest.raises(LayerError, match=reason) as error:
        check_layer(WithInputLayer(0).eval(), name, (8, 8, 8), 2)
    assert "valid layers: input_layer, unet, unet.encoder.stages" in str(error.value)
    assert "\n" not in str(error.value)


def test_layers_command_lists_layers_and_marks_the_default(tmp_path):
    folder = write_model_folder(tmp_path / "model")
    result = CliRunner().invoke(main, ["layers", "-m", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:4] == ["decoder.stages.0", "4", "1x1x1", "(default)"] for line in lines)
    assert any(line.split()[:3] == ["encoder.stages.1", "8", "2x2x2"] for line in lines)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """One fake case explained with both methods in one run through the CLI (comma list)."""
    root = tmp_path_factory.mktemp("gradcampp")
    write_model_folder(root / "model")
    write_case(root / "images", "case_0", seed=0, labels_dir=root / "labels")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = CliRunner().invoke(main, ["explain", "-i", str(root / "images"), "-o", str(root / "out"), "-m",
                                       str(root / "model"), "--gt", str(root / "labels"), "--samples", "1",
                                       "--method", "smoothgrad,gradcampp", "--disable_tta", "-device", "cpu"])
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root


def test_both_methods_in_one_run_write_maps_and_columns(explained):
    out = explained / "out"
    source = sitk.ReadImage(str(explained / "images" / "case_0_0000.nii.gz"))
    table = pd.read_csv(out / "case_0" / "instances.csv")
    assert len(table) == 2 and (table.gradcampp_peak >= table.gradcampp_mean).all() and (table.gradcampp_mean > 0).all()
    assert {"smoothgrad_FLAIR_peak_pos", "smoothgrad_samples", "smoothgrad_rel_std_error"} <= set(table.columns)
    instances = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_0" / "instances.nii.gz")))
    for row in table.itertuples():
        image = sitk.ReadImage(str(out / "case_0" / "gradcampp" / f"{row.instance_id:03d}.nii.gz"))
        assert image.GetSize() == source.GetSize() and np.allclose(image.GetDirection(), source.GetDirection())
        cam = sitk.GetArrayFromImage(image)
        assert cam.min() >= -1e-4  # a ReLU map (resampling may undershoot a hair)
        assert (out / "case_0" / "smoothgrad" / f"{row.instance_id:03d}_FLAIR.nii.gz").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["methods"] == ["smoothgrad", "gradcampp"]
    assert record["settings"]["layer"] == "decoder.stages.0"  # the default, resolved and recorded


@pytest.mark.parametrize("arguments, message", [
    (["--method", "gradcampp", "--layer", "nope"], "Error: unknown layer 'nope'; valid layers: encoder.stages.0,"),
    (["--method", "gradcampp", "--layer", "encoder.stages.0.0.convs.0.norm"],
     "Error: layer 'encoder.stages.0.0.convs.0.norm' cannot be hooked: its output is modified in place"),
    (["--method", "gradcam"], "unknown method 'gradcam'; choose from smoothgrad, gradcampp"),
    (["--amp"], "--amp needs -device cuda"),
])
def test_bad_gradcampp_and_amp_options_are_one_line_errors(explained, tmp_path, arguments, message):
    result = CliRunner().invoke(main, ["explain", "-i", str(explained / "images"), "-o", str(tmp_path / "out"),
                                       "-m", str(explained / "model"), "-device", "cpu", *arguments])
    assert result.exit_code != 0 and message in result.output
    assert not list((tmp_path / "out").glob("*/instances.csv"))


def test_instances_beyond_the_memory_budget_go_in_groups_with_the_same_maps():
    shape = (13, 12, 6)
    data = torch.randn(2, *shape, generator=torch.Generator().manual_seed(7))
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    masks = masks_for(shape)
    together = instance_gradcampp(window, data, masks)
    one_by_one = instance_gradcampp(window, data, masks, engine=GradientEngine(memory_budget_mb=1e-3))
    for instance_id in masks:
        np.testing.assert_allclose(one_by_one[instance_id], together[instance_id], rtol=1e-6, atol=1e-9)


def test_groups_fill_the_budget_in_order():
    regions = {1: (slice(0, 2), slice(0, 2)), 2: (slice(0, 1), slice(0, 2)), 3: (slice(0, 4), slice(0, 4))}
    assert _groups(regions, 1, budget=6) == [[1, 2], [3]]  # sizes 4, 2, 16: the oversized one alone
    assert _groups(regions, 1, budget=100) == [[1, 2, 3]]


def test_mirrorings_are_differentiated_one_at_a_time():
    """With 8 mirrorings the graphs held at once are one pass's, as without mirroring; the map is unchanged."""
    shape = (10, 9, 8)
    data = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
    masks = {1: np.zeros(shape, bool)}
    masks[1][2:5, 3:6, 3:6] = True
    peaks = {}
    for mirror in ((0, 1, 2), None):
        with peak_graph_bytes() as peak:
            instance_gradcampp(SlidingWindow([tiny_unet(0)], (8, 8, 8), mirror_axes=mirror), data, masks)
        peaks[mirror] = peak[0]
    assert 0 < peaks[(0, 1, 2)] < 1.2 * peaks[None]
