"""Perilesional context: the masked input, exact tile-subset prediction, the required-context estimate, the CLI."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from nnxai.cli import main
from nnxai.experiments.common import predict, predict_near, tiles_for
from nnxai.experiments.context import (COLUMNS, ContextDesign, bootstrap_required_context, lesion_context_curve,
                                       required_context, summarize_context)
from nnxai.explain.cases import read_ground_truth
from nnxai.explain.cohort import explain_case
from nnxai.lesions.instances import case_instances, label_components
from nnxai.nnunet.geometry import probabilities_in_original_space, read_images, to_network_space
from tests.experiment_data import SETTINGS, explained_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    model, out = explained_cohort(root)
    window = model.sliding_window(SETTINGS.step_size, SETTINGS.use_mirroring)
    files = [root / "images" / f"case_0_000{c}.nii.gz" for c in range(2)]
    images, properties = read_images(model, files)
    full = predict(model, window, images, properties, SETTINGS)
    gt = read_ground_truth(model, root / "labels" / "case_0.nii.gz", files[0], 1)
    lesion = next(i for i in case_instances(full.binary, gt) if i.group == "TP").mask
    return root, model, out, window, full, lesion


def window_probability(model, window, full):
    """The float32 differentiable window's full prediction, which tile subsets reproduce exactly."""
    with torch.no_grad():
        return probabilities_in_original_space(model, window.logits(full.data), full.properties)[1]


def test_experiments_predict_the_explained_segmentation_even_where_float32_disagrees(cohort, tmp_path):
    root, model, _, window, full, _ = cohort
    float32 = window_probability(model, window, full)
    voxel = np.unravel_index(np.argmax(np.abs(float32 - full.probability)), float32.shape)
    assert float32[voxel] != full.probability[voxel]  # float16 accumulation (nnU-Net) against float32
    settings = replace(SETTINGS, threshold=float((float32[voxel] + full.probability[voxel]) / 2))
    files = [root / "images" / f"case_0_000{c}.nii.gz" for c in range(2)]
    explain_case(model, "case_0", files, tmp_path, settings)
    images, properties = read_images(model, files)
    prediction = predict(model, window, images, properties, settings)
    explained = read_ground_truth(model, tmp_path / "case_0" / "prediction.nii.gz", files[0], 1)
    assert np.array_equal(prediction.binary, explained)
    assert not np.array_equal(float32 > settings.threshold, explained)  # the float32 window differs at `voxel`


def test_tile_subset_prediction_equals_full_prediction_on_the_lesion(cohort):
    _, model, _, window, full, lesion = cohort
    layout = window.layout(full.data.shape[1:])
    tiles = tiles_for(model, window, layout, lesion, full.properties)
    assert 0 < len(tiles) < len(layout.tiles)
    with torch.no_grad():
        logits = window.logits(full.data, tiles, layout)
    probability = probabilities_in_original_space(model, logits, full.properties)[1]
    whole = window_probability(model, window, full)
    assert np.allclose(probability[lesion], whole[lesion], atol=1e-6)
    assert not np.allclose(probability, whole, atol=1e-3)  # elsewhere the subset is partial
    assert np.allclose(whole, full.probability, atol=1e-2)  # nnU-Net's own, to its float16 rounding


def test_prediction_near_a_region_has_the_full_components_touching_it(cohort):
    _, model, _, window, full, lesion = cohort
    seed = np.zeros_like(lesion)
    seed[tuple(np.argwhere(lesion)[0])] = True  # one voxel of the lesion: its whole component must come out
    local = predict_near(model, window, full.data, full.properties, seed, SETTINGS)
    assert len(local.tiles) < len(window.layout(full.data.shape[1:]).tiles) and not local.exact.all()
    whole = window_probability(model, window, full)
    assert np.allclose(local.probability[local.exact], whole[local.exact], atol=1e-6)
    components = label_components(local.binary)
    assert np.array_equal(components == components[seed][0], lesion)  # the TP instance, voxel for voxel


def test_context_curve_masks_the_normalized_input_and_ends_at_the_full_prediction(cohort):
    _, model, _, window, full, lesion = cohort
    rows = lesion_context_curve(model, window, full, lesion, np.array([0.0, 100.0]), SETTINGS)
    # k = 0: the network sees the lesion's own voxels, 0 (normalized background) everywhere else
    network_lesion = to_network_space(model, lesion.astype(np.uint8), full.properties) > 0
    with torch.no_grad():
        alone = window.logits(full.data * torch.from_numpy(network_lesion))
    alone_probability = probabilities_in_original_space(model, alone, full.properties)[1][lesion].mean()
    assert rows[0]["k_mm"] == 0 and not rows[0]["whole_image"]
    assert rows[0]["mean_probability"] == pytest.approx(alone_probability, abs=1e-6)
    assert abs(rows[0]["mean_probability"] - full.probability[lesion].mean()) > 1e-3
    # k larger than the image: the whole input is kept, which is the full prediction
    assert rows[1]["whole_image"] and rows[1]["detected"]
    assert rows[1]["mean_probability"] == pytest.approx(full.probability[lesion].mean(), abs=1e-6)


def hand_table(curves: dict[str, list[int]], k_values=(0, 1, 2, 3, 4)) -> pd.DataFrame:
    rows = [{"case": case, "lesion_id": 1, "k_mm": k, "detected": bool(d), "mean_probability": 0.5 * d}
            for case, curve in curves.items() for k, d in zip(k_values, curve)]
    return pd.DataFrame(rows)


# detection rates per k: 0, 0.25, 0.75, 0.5, 1.0 (a dip at k = 3)
CURVES = {"a": [0, 1, 1, 0, 1], "b": [0, 0, 1, 1, 1], "c": [0, 0, 1, 0, 1], "d": [0, 0, 0, 1, 1]}


def test_required_context_is_where_the_rate_stays_on_its_plateau():
    detected = hand_table(CURVES).pivot(index="case", columns="k_mm", values="detected").to_numpy()
    k = np.arange(5.0)
    assert required_context(detected, k, 0.95) == 4  # only k = 4 reaches 0.95 x 1.0
    assert required_context(detected, k, 0.7) == 4  # k = 2 reaches 0.75 but k = 3 falls to 0.5
    assert required_context(detected, k, 0.5) == 2  # from k = 2 on, every rate is >= 0.5
    assert required_context(detected, k, 0.25) == 1
    assert np.isnan(required_context(np.zeros((3, 5), bool), k))  # nothing detected: no plateau


def test_summary_and_bootstrap_interval():
    summary = summarize_context(hand_table(CURVES), plateau_fraction=0.5, bootstrap=200, seed=1)
    assert summary["required_context_mm"] == 2 and summary["n_lesions"] == 4 and summary["n_cases"] == 4
    assert summary["detection_rate"] == [0, 0.25, 0.75, 0.5, 1.0]
    assert summary["ci_low"] <= 2 <= summary["ci_high"] and summary["bootstrap_defined"] <= 200
    same = hand_table({name: [0, 0, 1, 1, 1] for name in "abcdef"})
    replicates = bootstrap_required_context(same.pivot(index="case", columns="k_mm", values="detected").to_numpy(),
                                            np.arange(5.0), samples=50)
    assert np.all(replicates == 2)  # identical lesions: every resample gives the same answer
    empty = summarize_context(pd.DataFrame(columns=COLUMNS))
    assert empty["required_context_mm"] is None and "no lesion" in empty["note"]


def test_design_selection_and_radii():
    design = ContextDesign(groups=("TP", "FN"), min_voxels=91, max_voxels=119, max_mm=3, step_mm=1.5)
    assert design.k_values().tolist() == [0, 1.5, 3]
    assert design.selects("TP", 91, 91.0) and design.selects("FN", 119, 1e6)
    assert not design.selects("FP", 100, 100.0) and not design.selects("TP", 120, 120.0)
    by_volume = ContextDesign(min_voxels=None, max_voxels=None, min_mm3=50, max_mm3=60)
    assert by_volume.selects("TP", 3, 55.0) and not by_volume.selects("TP", 3, 61.0)


def test_cli_on_an_explain_output_resumes_and_reports_the_image_limit(cohort):
    root, _, out, _, _, _ = cohort
    runner = CliRunner()
    args = ["experiment", "context", str(out), "--min-voxels", "1", "--max-voxels", "100000", "--max-mm", "60",
            "--step-mm", "30", "--bootstrap", "20", "-device", "cpu"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "the whole image lies within" in result.output  # 60 mm is more than this small image holds
    table = pd.read_csv(out / "experiments" / "context.csv")
    assert list(table.columns) == COLUMNS
    assert set(table.group) == {"TP"} and table.lesion_id.nunique() == 2
    assert table.groupby("lesion_id").k_mm.apply(list).tolist() == [[0, 30, 60]] * 2
    assert table[table.k_mm == 60].whole_image.all() and table[table.k_mm == 60].detected.all()
    summary = json.loads((out / "experiments" / "context_summary.json").read_text())
    assert summary["n_lesions"] == 2 and summary["k_mm"] == [0, 30, 60] and "definition" in summary

    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "0 case(s) done, 1 finished earlier" in again.output
    other = runner.invoke(main, [*args[:-2], "--step-mm", "20", "-device", "cpu"])
    assert other.exit_code == 1 and "other parameters" in other.output and "Traceback" not in other.output


def test_cli_refuses_missing_truth_a_changed_model_and_a_non_explain_folder(cohort, tmp_path):
    _, _, out, _, _, _ = cohort
    runner = CliRunner()
    record = json.loads((out / "run.json").read_text())
    record["ground_truth"] = None
    no_truth = tmp_path / "no_truth"
    no_truth.mkdir()
    (no_truth / "run.json").write_text(json.dumps(record))
    (no_truth / "instances.csv").write_text((out / "instances.csv").read_text())
    result = runner.invoke(main, ["experiment", "context", str(no_truth), "-device", "cpu"])
    assert result.exit_code == 1 and "groups TP need ground truth" in result.output
    record["model"]["checkpoint_sha256"] = {"0": "0" * 64}
    (no_truth / "run.json").write_text(json.dumps(record))
    result = runner.invoke(main, ["experiment", "context", str(no_truth), "-device", "cpu"])
    assert result.exit_code == 1 and "changed since the explain run" in result.output
    result = runner.invoke(main, ["experiment", "context", str(tmp_path), "-device", "cpu"])
    assert result.exit_code == 1 and "run.json: missing" in result.output
