"""Convergence-based sampling (`--samples auto`): running statistics, stopping rule, independence of instances."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from nnxai.attribution.engine import RunningMean
from nnxai.attribution.smoothgrad import Sampling, smoothgrad_maps
from nnxai.cli import main
from nnxai.nnunet.sliding_window import SlidingWindow
from tests.conftest import tiny_unet
from tests.fake_model import write_case, write_model_folder
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

SHAPE = (12, 10, 9)


def case():
    data = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(6))
    first = np.zeros(SHAPE, bool)
    first[2:5, 2:5, 2:4] = True
    second = np.zeros(SHAPE, bool)
    second[8:11, 6:9, 5:8] = True
    return data, {1: first, 2: second}


def test_running_mean_and_standard_error_by_hand():
    running = RunningMean((2,), torch.device("cpu"))
    running.add(torch.tensor([1.0, 2.0]))
    assert math.isnan(running.relative_standard_error())
    running.add(torch.tensor([3.0, 6.0]))
    assert running.mean.tolist() == [2.0, 4.0]
    # sample variances [2, 8], of the mean [1, 4]: error sqrt(5) against a mean of norm sqrt(20)
    assert running.relative_standard_error() == pytest.approx(0.5)
    assert running.peak_relative_standard_error() == pytest.approx(2 / 4)  # at the second voxel (|4| > |2|)
    assert running.converged(0.5) and not running.converged(0.49)


def test_without_noise_every_instance_stops_at_the_minimum():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = case()
    maps = dict(smoothgrad_maps(window, data, masks, Sampling(None, tol=0.01, max_samples=50, min_samples=3),
                                noise=0.0))
    for result in maps.values():
        assert result.samples == 3 and result.relative_standard_error == 0.0


def test_auto_map_is_the_fixed_map_with_the_samples_it_used_and_stops_for_each_instance_alone():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = case()
    auto = Sampling(None, tol=0.2, max_samples=20, min_samples=3)
    together = dict(smoothgrad_maps(window, data, masks, auto, noise=0.02, generator=torch.Generator().manual_seed(2)))
    used = {i: r.samples for i, r in together.items()}
    assert all(3 <= n < 20 for n in used.values())
    for instance_id, mask in masks.items():
        result = together[instance_id]
        assert result.relative_standard_error <= 0.2
        fixed = dict(smoothgrad_maps(window, data, {instance_id: mask}, Sampling(used[instance_id]), noise=0.02,
                                     generator=torch.Generator().manual_seed(2)))[instance_id]
        np.testing.assert_allclose(result.map, fixed.map, rtol=1e-5, atol=1e-7)
        assert fixed.samples == used[instance_id] and math.isnan(fixed.relative_standard_error)
        alone = dict(smoothgrad_maps(window, data, {instance_id: mask}, auto, noise=0.02,
                                     generator=torch.Generator().manual_seed(2)))[instance_id]
        assert alone.samples == used[instance_id]


def test_auto_sampling_stops_at_the_cap():
    window = SlidingWindow([tiny_unet()], (8, 8, 8))
    data, masks = case()
    maps = dict(smoothgrad_maps(window, data, {2: masks[2]}, Sampling(None, tol=1e-6, max_samples=4, min_samples=2),
                                noise=0.2))
    assert maps[2].samples == 4 and maps[2].relative_standard_error > 1e-6


def test_antithetic_pairs_are_the_observations_by_hand():
    running = RunningMean((2,), torch.device("cpu"), pairs=True)
    for sample in ([1.0, 2.0], [3.0, 6.0], [5.0, 6.0]):
        running.add(torch.tensor(sample))
    assert running.count == 3 and running.in_pair and running.mean.tolist() == [2.0, 4.0]
    assert math.isnan(running.relative_standard_error())  # one pair so far
    running.add(torch.tensor([1.0, 6.0]))
    assert not running.in_pair and running.mean.tolist() == [2.5, 5.0]
    # pair means [2, 4] and [3, 6]: variances of the mean [0.25, 1], error sqrt(1.25) against sqrt(31.25)
    assert running.relative_standard_error() == pytest.approx(0.2)


class Quadratic(nn.Module):
    """Logits = conv(x)^2: the input gradient is affine in x, so an antithetic pair averages to the clean gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) ** 2


def test_antithetic_pairs_cancel_the_noise_of_a_gradient_affine_in_the_input():
    window = SlidingWindow([Quadratic()], (8, 8, 8))
    data, masks = case()

    def maps(sampling: Sampling, noise: float) -> dict:
        return dict(smoothgrad_maps(window, data, masks, sampling, noise=noise,
                                    generator=torch.Generator().manual_seed(3)))

    clean = maps(Sampling(1), 0.0)
    paired = maps(Sampling(4, antithetic=True), 0.2)
    independent = maps(Sampling(4), 0.2)
    auto = maps(Sampling(None, tol=1e-3, max_samples=20, min_samples=3, antithetic=True), 0.2)
    for i in masks:
        scale = np.abs(clean[i].map).max()
        np.testing.assert_allclose(paired[i].map, clean[i].map, atol=1e-5 * scale)
        assert np.abs(independent[i].map - clean[i].map).max() > 0.01 * scale
        # identical pair means: converged after the first whole pairs past min_samples
        assert auto[i].samples == 4 and auto[i].relative_standard_error < 1e-3


@pytest.mark.parametrize("sampling", [dict(samples=0), dict(samples=None, tol=0.0),
                                      dict(samples=None, min_samples=10, max_samples=5),
                                      dict(samples=None, min_samples=1),
                                      dict(samples=None, max_samples=7, antithetic=True)])
def test_invalid_sampling_is_refused(sampling):
    with pytest.raises(ValueError):
        Sampling(**sampling)


def test_explain_records_samples_used_and_standard_error_per_instance(tmp_path):
    write_model_folder(tmp_path / "model")
    write_case(tmp_path / "images", "case_0", seed=0)
    result = CliRunner().invoke(main, ["explain", "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"),
                                       "-m", str(tmp_path / "model"), "--samples", "auto", "--tol", "0.3",
                                       "--max-samples", "8", "--disable_tta", "-device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "instances.csv")
    assert len(table) == 2
    for row in table.itertuples():
        assert 5 <= row.smoothgrad_samples <= 8
        assert row.smoothgrad_rel_std_error <= 0.3 or row.smoothgrad_samples == 8
    settings = json.loads((tmp_path / "out" / "run.json").read_text())["settings"]
    assert settings["samples"] == "auto" and settings["antithetic"] is True  # pairs by default with auto


@pytest.mark.parametrize("options, antithetic", [(["--samples", "2"], False),
                                                 (["--samples", "2", "--antithetic"], True),
                                                 (["--samples", "auto", "--independent-noise"], False)])
def test_noise_pairing_is_resolved_and_recorded(tmp_path, options, antithetic):
    write_model_folder(tmp_path / "model")
    write_case(tmp_path / "images", "case_0", seed=0)
    result = CliRunner().invoke(main, ["explain", "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"),
                                       "-m", str(tmp_path / "model"), "--max-samples", "6", "--disable_tta",
                                       "-device", "cpu", *options])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "run.json").read_text())["settings"]["antithetic"] is antithetic


@pytest.mark.parametrize("samples", ["0", "many"])
def test_bad_sample_counts_are_refused(tmp_path, samples):
    result = CliRunner().invoke(main, ["explain", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m",
                                       str(tmp_path), "--samples", samples])
    assert result.exit_code == 2 and f"'{samples}' is neither a positive number nor 'auto'" in result.output
