"""Fast smoke runs of the benchmark scripts (tiny networks, a 4 mm phantom, every comparison) and the properties
the noise designs rest on."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from benchmarks import noise_designs, tile_precision
from benchmarks.explain_benchmark import main, spread, tile_sharing_pair
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)


def test_benchmark_runs_every_part_and_its_maps_agree(tmp_path):
    arguments = ["--workdir", str(tmp_path), "--parts", "all", "--cases", "4", "--case", "phantom_001", "--spacing", "4",
                 "--instances", "2", "--features", "4,8", "--convs", "1", "--patch", "16", "--samples", "1",
                 "--max-voxels", "4", "--auto-instances", "2", "--fixed-samples", "3", "--reference-samples", "4",
                 "--max-samples", "6", "--json", str(tmp_path / "figures.json")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["setup"]["instances"] == 2 and figures["setup"]["mean_tiles_per_instance"] >= 1
    warm_ups = figures["setup"]["warm_up_seconds"]  # every method's first call is kept out of its figures
    assert set(warm_ups) == {"(i) study", "ours", "(ii) Captum", "bf16", "fp16"}
    assert all(s > 0 for s in warm_ups.values())
    mean = figures["mean"]
    assert mean["(ii) Captum NoiseTunnel(Saliency)"]["max_rel_difference"] < 1e-4  # same noise, same maps
    assert mean[next(k for k in mean if k.startswith("(iii) ours"))]["max_rel_difference"] < 1e-4
    assert all(run["max_rel_difference"] < 1e-4 for name, run in figures["max"].items() if name.startswith("ours"))
    for row in figures["auto"]["per_instance"]:
        assert 5 <= row["auto, independent noise"]["samples"] <= 6
        assert row["auto, antithetic pairs"]["samples"] == 6  # whole pairs: at least 5, at most 6
        assert row["fixed 3, independent noise"]["samples"] == 3
    assert 0 < figures["amp"]["bf16"]["median_rel_l2"] < 0.2
    assert "ours is" in result.output and "tiles per instance on average" in result.output


def test_benchmark_times_a_mirrored_fold_ensemble_without_the_whole_window_graph(tmp_path):
    arguments = ["--workdir", str(tmp_path), "--parts", "amp", "--amp", "fp16", "--cases", "4", "--case", "phantom_001",
                 "--spacing", "4", "--instances", "1", "--features", "4,8", "--convs", "1", "--patch", "16",
                 "--folds", "2", "--tta", "--json", str(tmp_path / "figures.json")]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["setup"]["folds"] == 2 and figures["setup"]["tta"] and "2 fold(s), TTA on" in result.output
    assert set(figures["setup"]["warm_up_seconds"]) == {"ours", "fp16"}  # the study's graph is not built for amp
    assert 0 < figures["amp"]["fp16"]["median_rel_l2"] < 0.2


def test_spread_picks_evenly_over_the_order():
    assert spread([1, 2, 3, 4, 5, 6, 7], 3) == [1, 4, 7]
    assert spread([1, 2], 5) == [1, 2] and spread([4, 5, 6], 1) == [4]


def test_tile_precision_times_every_variant_against_float32(tmp_path):
    arguments = ["--features", "4,8", "--convs", "1", "--patch", "16", "--device", "cpu", "--repeats", "1",
                 "--json", str(tmp_path / "tile.json")]
    result = CliRunner().invoke(tile_precision.main, arguments)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "tile.json").read_text())
    rows = {(row["precision"], row["channels_last"]): row for row in figures["rows"]}
    assert set(rows) == {(p, c) for p in tile_precision.PRECISIONS for c in (False, True)}
    assert rows["fp32", False]["gradient_rel_l2"] == 0 and rows["fp32", True]["gradient_rel_l2"] < 1e-5
    assert 1e-3 < rows["bf16", False]["gradient_rel_l2"] < 1  # autocast did run in low precision
    assert all(row["forward_s"] > 0 and row["backward_s"] > 0 for row in rows.values())


@pytest.mark.parametrize("name", [name for name, split in noise_designs.DESIGNS.items() if split is not None])
def test_noise_design_blocks_are_independent_gaussians_of_the_draw(name):
    """Blocks sum to the draw and are orthogonal, so every sign pattern is again white Gaussian noise."""
    noise = torch.randn(2, 8, 6, 5, generator=torch.Generator().manual_seed(0))
    blocks = noise_designs.DESIGNS[name](noise)
    torch.testing.assert_close(sum(blocks), noise, atol=1e-5, rtol=0)
    for a in range(len(blocks)):
        for b in range(a + 1, len(blocks)):
            assert abs(float((blocks[a] * blocks[b]).sum())) < 1e-3 * float(noise.square().sum())
    samples = noise_designs.group(noise, noise_designs.DESIGNS[name])
    assert len(samples) == 2 ** len(blocks) and torch.stack(samples).mean(0).abs().max() < 1e-5
    assert all(torch.allclose(s.square().sum(), noise.square().sum(), rtol=1e-4) for s in samples)


def test_sign_designs_cancel_a_gradient_linear_in_the_noise():
    """Gradient = clean + linear(noise): every sign design's group mean is exact, independent draws are not."""
    torch.manual_seed(0)
    convolution = torch.nn.Conv3d(2, 2, 3, padding=1)
    clean = torch.randn(2, 8, 6, 5)

    def gradient(draw):
        with torch.no_grad():
            return clean + convolution(draw[None])[0]

    errors = {name: noise_designs.relative_error_per_sample(gradient, tuple(clean.shape), 0.5, split, 16,
                                                            torch.Generator().manual_seed(1))
              for name, split in noise_designs.DESIGNS.items()}
    assert errors.pop("independent") > 0.05
    assert all(error < 1e-5 for error in errors.values()), errors


def test_noise_designs_command_reports_every_design(tmp_path):
    arguments = ["--workdir", str(tmp_path), "--cases", "4", "--case", "phantom_001", "--spacing", "4",
                 "--features", "4,8", "--convs", "1", "--patch", "16", "--instances", "1", "--min-size", "1",
                 "--samples", "16", "--threads", "1", "--json", str(tmp_path / "designs.json")]
    result = CliRunner().invoke(noise_designs.main, arguments)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "designs.json").read_text())["rows"]
    assert [row["design"] for row in rows] == list(noise_designs.DESIGNS)
    assert all(row["relative_error_per_sample"] > 0 and row["samples_for_tol"] >= 1 for row in rows)


def test_warm_up_pair_is_the_smallest_that_shares_a_tile():
    masks = {1: np.ones(2), 2: np.ones(3), 3: np.ones(5), 4: np.ones(9)}
    assert tile_sharing_pair(masks, {1: {0}, 2: {1}, 3: {1, 2}, 4: {0}}) == [2, 3]  # 8 voxels, not 1 + 4 = 11
    assert tile_sharing_pair(masks, {1: {0}, 2: {1}, 3: {2}, 4: {3}}) == [1, 2]  # no tile shared: the smallest
