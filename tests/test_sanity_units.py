"""Sanity-check building blocks on hand-made inputs: layer order, randomization, statistics, curves, parsing."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnxai.nnunet.sliding_window import SlidingWindow
from nnxai.sanity.common import SanityError, instance_box, instance_logits, select_instances
from nnxai.sanity.faithfulness import (DELETION, INSERTION, _InstanceProbe, deletion_areas, deletion_groups,
                                       parse_percentages)
from nnxai.sanity.randomization import (CASCADING, COLUMNS, Step, _comparison_rows, block_name, compare_maps,
                                        randomizable_blocks, randomization_verdicts, randomized_copy)
from tests.conftest import tiny_unet
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)


def three_stage_unet() -> nn.Module:
    torch.manual_seed(0)
    return PlainConvUNet(2, 3, (2, 4, 4), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True, nn.InstanceNorm3d,
                         {"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=False).eval()


def test_blocks_run_from_output_to_input_and_skip_unused_heads():
    blocks = randomizable_blocks(three_stage_unet(), (2, 8, 8, 8))
    # without deep supervision only the last segmentation head runs: seg_layers.0 is not a block
    assert blocks == ["decoder.seg_layers.1", "decoder.stages.1", "decoder.transpconvs.1", "decoder.stages.0",
                      "decoder.transpconvs.0", "encoder.stages.2", "encoder.stages.1", "encoder.stages.0"]
    assert randomizable_blocks(three_stage_unet(), (2, 8, 8, 8), ["encoder.stages"]) == [
        "encoder.stages.2", "encoder.stages.1", "encoder.stages.0"]
    assert block_name("encoder.stages.0.0.convs.0.conv") == "encoder.stages.0"
    assert block_name("head") == "head"


def test_bad_layer_names_and_weightless_networks_are_one_line_errors():
    with pytest.raises(SanityError, match=r"--layers decoder.stage: no randomizable layer of this name; the network"):
        randomizable_blocks(tiny_unet(), (2, 8, 8, 8), ["decoder.stage"])
    with pytest.raises(SanityError, match="Sequential: the network has no layers with weights to randomize"):
        randomizable_blocks(nn.Sequential(nn.ReLU()), (2, 8, 8, 8))


def test_randomized_copy_changes_only_its_blocks_reproducibly():
    network = tiny_unet()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    first = randomized_copy(network, ["decoder.stages.0"], seed=3).state_dict()
    again = randomized_copy(network, ["decoder.stages.0"], seed=3).state_dict()
    other_seed = randomized_copy(network, ["decoder.stages.0"], seed=4).state_dict()
    for key, value in network.state_dict().items():
        assert torch.equal(value, before[key])  # the original network is untouched
        assert torch.equal(first[key], again[key])
        if not key.startswith("decoder.stages.0."):
            assert torch.equal(first[key], value)
    assert not torch.equal(first["decoder.stages.0.convs.0.conv.weight"],
                           network.state_dict()["decoder.stages.0.convs.0.conv.weight"])
    weight = first["decoder.stages.0.convs.0.conv.weight"]
    assert not torch.equal(weight, other_seed["decoder.stages.0.convs.0.conv.weight"])
    fan_in = weight[0].numel()  # nnU-Net's He initialization: std = sqrt(2 / (1 + 0.01^2) / fan_in), zero bias
    assert float(weight.std()) == pytest.approx(np.sqrt(2 / 1.0001 / fan_in), rel=0.15)
    assert not first["decoder.stages.0.convs.0.conv.bias"].any()
    assert torch.equal(first["decoder.stages.0.convs.0.norm.weight"], torch.ones(4))


def test_map_comparison_statistics():
    rng = np.random.default_rng(0)
    original = rng.normal(size=(9, 9, 9))
    same = compare_maps(original, 3 * original)
    assert same == pytest.approx({"spearman_abs": 1, "spearman_signed": 1, "ssim_abs": 1, "ssim_signed": 1})
    flipped = compare_maps(original, -original)
    assert flipped["spearman_signed"] == pytest.approx(-1) and flipped["spearman_abs"] == pytest.approx(1)
    assert flipped["ssim_abs"] == pytest.approx(1) and flipped["ssim_signed"] < 0
    unrelated = compare_maps(original, rng.normal(size=(9, 9, 9)))
    assert all(abs(value) < 0.15 for value in unrelated.values())
    emptied = compare_maps(original, np.zeros_like(original))  # e.g. Grad-CAM++ of a random network: all zero
    assert np.isnan(emptied["spearman_abs"]) and np.isnan(emptied["spearman_signed"])  # no ranking, not "0"
    assert np.isnan(compare_maps(np.ones_like(original), original)["spearman_abs"])  # no ranking to keep



def test_constant_randomized_maps_get_their_own_verdict_not_a_pass():
    rng = np.random.default_rng(1)
    originals = {i: rng.normal(size=(1, 9, 9, 9)) for i in (1, 2, 3)}
    box = (slice(None),) * 4
    final = Step(CASCADING, 1, "encoder.stages.0", ("encoder.stages.0",))

    def verdict(randomized: dict[int, np.ndarray]) -> pd.Series:
        rows = _comparison_rows("case_0", dict.fromkeys(originals, "TP"), "gradcampp", final, originals, randomized,
                                dict.fromkeys(originals, box), ["FLAIR"])
        return randomization_verdicts(pd.DataFrame(rows, columns=COLUMNS)).iloc[0]

    flat = verdict({i: np.zeros_like(m) for i, m in originals.items()})  # Grad-CAM++ of a random network
    assert (flat.verdict, flat.constant_maps, flat.instances) == ("constant", 3, 0)
    mostly_flat = verdict({1: rng.normal(size=(1, 9, 9, 9)), 2: np.zeros((1, 9, 9, 9)), 3: np.ones((1, 9, 9, 9))})
    assert (mostly_flat.verdict, mostly_flat.constant_maps, mostly_flat.instances) == ("constant", 2, 1)
    structured = verdict({1: rng.normal(size=(1, 9, 9, 9)), 2: rng.normal(size=(1, 9, 9, 9)),
                          3: np.zeros((1, 9, 9, 9))})
    assert (structured.verdict, structured.constant_maps, structured.instances) == ("passes", 1, 2)

def test_instance_box_grows_by_margin_in_mm_and_stays_inside():
    mask = np.zeros((10, 12, 8), bool)
    mask[1:3, 5:7, 6] = True
    assert instance_box(mask, (1.0, 2.0, 0.5), 2.0) == (slice(0, 5), slice(4, 8), slice(2, 8))


def test_instance_logits_equal_the_whole_window_at_the_instance():
    window = SlidingWindow([tiny_unet()], (8, 8, 8), mirror_axes=(0,))
    data = torch.randn(2, 18, 13, 9, generator=torch.Generator().manual_seed(1))
    mask = np.zeros((18, 13, 9), bool)
    mask[2:4, 3:5, 1:3] = True
    with torch.no_grad():
        expected = window.logits(data)[:, torch.from_numpy(mask)]
        torch.testing.assert_close(instance_logits(window, data, mask), expected)


def test_selection_takes_groups_in_turn():
    table = pd.DataFrame({"case": ["a", "a", "a", "b", "b"], "instance_id": [1, 2, 3, 1, 2],
                          "group": ["TP", "TP", "FP", "FN", "TP"], "network_voxels": [5, 5, 5, 5, 0]})
    run = SimpleNamespace(instances=table, out_dir="OUT")
    chosen = select_instances(run, max_instances=3)
    assert list(zip(chosen.case, chosen.instance_id, chosen.group)) == [("a", 1, "TP"), ("a", 3, "FP"), ("b", 1, "FN")]
    assert select_instances(run, groups=["TP"]).instance_id.tolist() == [1, 2]  # b/2 vanished in network space
    with pytest.raises(SanityError, match="OUT: no explained case named c"):
        select_instances(run, cases=["c"])


def test_percentages_parse_and_refuse_values_outside_0_100():
    assert parse_percentages("0:50:25") == [0, 25, 50]
    assert parse_percentages("10, 0,5") == [0, 5, 10]
    for text, problem in [("0:150:10", "percentages must lie within 0-100"), ("-5:50:5", "within 0-100"),
                          ("0:50:0", "the step must be positive"), ("50", "at least two percentages"),
                          ("a:b:c", "expected START:STOP:STEP")]:
        with pytest.raises(SanityError, match=f"--k {text}: .*{problem}"):
            parse_percentages(text)


def test_deletion_and_insertion_change_the_chosen_voxels_of_the_box_only():
    data = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4) + 1
    box = (slice(1, 3), slice(0, 2), slice(2, 4))
    probe = _InstanceProbe(None, data, None, box, None, 1)
    deleted = probe.perturbed(DELETION, [1], np.array([0, 7]))  # box voxels (0,0,0) and (1,1,1)
    assert deleted[1, 1, 0, 2] == 0 and deleted[1, 2, 1, 3] == 0
    assert int((deleted != data).sum()) == 2
    inserted = probe.perturbed(INSERTION, [0], np.array([7]))
    assert inserted[0, 2, 1, 3] == data[0, 2, 1, 3]
    assert int((inserted != data).sum()) == 7 and inserted[0][box].sum() == data[0, 2, 1, 3]


def test_areas_between_curves_by_hand():
    points = []
    for mode in (DELETION, INSERTION):
        for curve, seed, probabilities in [("saliency", None, [1.0, 0.0]), ("random", 0, [1.0, 1.0]),
                                           ("random", 1, [1.0, 0.5])]:
            points += [{"case": "a", "instance_id": 1, "group": "TP", "method": "smoothgrad", "channel": "FLAIR",
                        "mode": mode, "curve": curve, "seed": seed, "k_percent": k, "mean_probability": p}
                       for k, p in zip((0, 50), probabilities)]
    areas = deletion_areas(pd.DataFrame(points))
    # trapezoids over the fraction 0 -> 0.5: saliency 0.25, random 0.5 and 0.375
    assert areas.area_saliency.tolist() == pytest.approx([0.25, 0.25])
    assert areas.area_random.tolist() == pytest.approx([0.4375, 0.4375])
    assert areas.area_random_sd.iloc[0] == pytest.approx(np.std([0.5, 0.375], ddof=1))
    assert areas.area_between.tolist() == pytest.approx([0.1875, -0.1875])
    groups = deletion_groups(areas)
    assert groups.verdict.tolist() == ["beats random", "does not beat random"]
    assert groups.fraction_positive.tolist() == [1.0, 0.0]
