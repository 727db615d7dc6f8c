"""Sanity checks end to end on an explain run of the tiny trained blob model (one case, two lesions)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from nnxai.cli import main
from nnxai.explain.cohort import explain_cohort
from nnxai.explain.output import AnalysisInputError
from nnxai.explain.reopen import reopen_run
from nnxai.explain.settings import ExplainSettings
from nnxai.nnunet.model import load_model
from nnxai.sanity.common import recompute_maps, select_instances
from nnxai.sanity.faithfulness import DELETION, deletion_areas, deletion_check, stored_maps
from nnxai.sanity.gradcheck import gradcheck_verdict, gradient_check
from nnxai.sanity.randomization import CASCADING, REFERENCE, randomization_check, randomization_verdicts
from tests.fake_model import write_case, write_model_folder
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sanity")
    write_case(root / "images", "case_0", seed=0, labels_dir=root / "labels")
    model = load_model(write_model_folder(root / "model"))
    settings = ExplainSettings(methods=("smoothgrad", "gradcampp"), samples=2, use_mirroring=False)
    result = explain_cohort(model, root / "images", root / "out", settings, root / "labels", progress=False)
    assert result.done == ["case_0"]
    return root / "out"


@pytest.fixture(scope="module")
def run(explained):
    return reopen_run(explained)


def test_stored_maps_come_back_to_network_space(run):
    """Maps read from OUT (input grid: transposed, resampled) match the maps recomputed on the network grid."""
    case_input = run.case_input("case_0")
    masks = {i: case_input.mask(i) for i in (1, 2)}
    recomputed = recompute_maps("smoothgrad", run.window(), case_input.data, masks, run.settings, "case_0")
    for instance_id in masks:
        stored = stored_maps(run, case_input, "smoothgrad", instance_id)
        assert stored.shape == recomputed[instance_id].shape
        for channel in range(2):
            correlation = np.corrcoef(stored[channel].ravel(), recomputed[instance_id][channel].ravel())[0, 1]
            assert correlation > 0.95


def test_randomizing_every_layer_decorrelates_smoothgrad(run):
    selection = select_instances(run)
    table = randomization_check(run, selection, ["smoothgrad"], independent=False)
    cascading = table[table.experiment == CASCADING]
    assert cascading.layer.drop_duplicates().tolist() == [
        "decoder.seg_layers.0", "decoder.stages.0", "decoder.transpconvs.0", "encoder.stages.1", "encoder.stages.0"]
    assert len(cascading) == 2 * 2 * 5 and len(table[table.experiment == REFERENCE]) == 2 * 2
    final = cascading[cascading.step == 5]
    flair = final[final.channel == "FLAIR"]
    assert flair.spearman_signed.abs().max() < 0.3 and flair.ssim_signed.abs().max() < 0.4
    assert flair.spearman_abs.max() < 0.6  # the instance's shape alone keeps some structure in |map|
    first = cascading[(cascading.step == 1) & (cascading.channel == "FLAIR")]
    assert (first.spearman_abs > flair.spearman_abs.to_numpy()).all()  # correlation drops as layers go random
    verdicts = randomization_verdicts(table, threshold=0.3, statistic="spearman_signed")
    assert verdicts[["channel", "verdict"]].values.tolist() == [["FLAIR", "passes"], ["T1", "passes"]]
    strict = randomization_verdicts(table, threshold=0.01, statistic="spearman_abs")
    assert set(strict.verdict) == {"fails"}  # a failing verdict is reported, not hidden


def test_deletion_by_saliency_drops_faster_than_random(run):
    curves = deletion_check(run, select_instances(run), ["smoothgrad"], [0, 10, 30], seeds=2)
    assert set(curves.curve) == {"saliency", "random"} and set(curves["mode"]) == {DELETION}
    start = curves[curves.k_percent == 0].groupby("instance_id").mean_probability
    assert (start.min() > 0.5).all() and (start.nunique() == 1).all()  # k = 0 is the unchanged prediction
    areas = deletion_areas(curves)
    flair = areas[areas.channel == "FLAIR"]
    assert len(flair) == 2 and (flair.area_between > 0.05).all()
    top = curves[(curves.channel == "FLAIR") & (curves.k_percent == 30)]
    by_curve = top.groupby(["instance_id", "curve"]).mean_probability.mean().unstack()
    assert (by_curve.saliency < 0.2).all() and (by_curve.random > by_curve.saliency + 0.3).all()
    # the lesion is dark on T1 (negative T1 saliency): only ranking by magnitude deletes it first
    by_magnitude = deletion_areas(deletion_check(run, select_instances(run, max_instances=1), ["smoothgrad"],
                                                 [0, 10, 30], seeds=2, ranking="absolute"))
    first_t1 = (areas.instance_id == 1) & (areas.channel == "T1")
    assert by_magnitude[by_magnitude.channel == "T1"].area_between.item() > 0 > areas[first_t1].area_between.item()


def test_gradient_matches_float64_finite_differences(run):
    table = gradient_check(run, "case_0", 1, voxels=2, step=1e-4)
    assert table.channel.tolist() == ["FLAIR", "FLAIR", "T1", "T1"]
    assert (table.map_value.abs() > 0.1).all()
    assert table.relative_error.max() < 1e-3
    assert gradcheck_verdict(table, 1e-4).verdict.item() == "passes"
    assert gradcheck_verdict(table.assign(relative_error=0.5), 1e-4).verdict.item() == "fails"


def test_cli_writes_tidy_tables(explained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(explained, out)
    runner = CliRunner()
    result = runner.invoke(main, ["sanity", "deletion", str(out), "--k", "0,20", "--seeds", "1", "--max-instances",
                                  "1", "--mode", "both", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "TP smoothgrad FLAIR deletion: beats random" in result.output
    curves = pd.read_csv(out / "sanity" / "deletion.csv")
    assert list(curves.columns) == ["case", "instance_id", "group", "method", "channel", "mode", "curve", "seed",
                                    "k_percent", "changed_voxels", "box_voxels", "mean_probability"]
    # both methods of the run: SmoothGrad per channel and one Grad-CAM++ map; x modes x curves x percentages
    assert len(curves) == (2 + 1) * 2 * 2 * 2 and set(curves.method) == {"smoothgrad", "gradcampp"}
    groups = pd.read_csv(out / "sanity" / "deletion_groups.csv")
    assert set(groups["mode"]) == {"deletion", "insertion"} and "verdict" in groups
    assert (out / "sanity" / "deletion.png").stat().st_size > 1000
    result = runner.invoke(main, ["sanity", "randomize", str(out), "--samples", "1", "--max-instances", "1",
                                  "--no-independent", "--layers", "encoder", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "smoothgrad FLAIR:" in result.output
    verdicts = pd.read_csv(out / "sanity" / "randomization_verdicts.csv")
    assert verdicts[["method", "channel"]].values.tolist() == [["smoothgrad", "FLAIR"], ["smoothgrad", "T1"],
                                                               ["gradcampp", "all"]]
    assert set(verdicts.verdict) <= {"passes", "fails"}
    record = json.loads((out / "sanity" / "randomization.json").read_text())
    assert record["blocks_output_to_input"] == ["encoder.stages.1", "encoder.stages.0"]
    result = runner.invoke(main, ["sanity", "gradcheck", str(out), "--voxels", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "case_0 instance 1: passes" in result.output
    assert len(pd.read_csv(out / "sanity" / "gradcheck.csv")) == 2


@pytest.mark.parametrize("arguments, message", [
    (["deletion", "--k", "0:150:10"], "Error: --k 0:150:10: percentages must lie within 0-100"),
    (["randomize", "--layers", "decoder.stage"], "Error: --layers decoder.stage: no randomizable layer of this name"),
    (["deletion", "--method", "gradcam"], "Error: unknown method 'gradcam'"),
    (["gradcheck", "--case", "case_0", "--instance", "9"], "no instance 9 in case case_0"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(explained, arguments, message):
    result = CliRunner().invoke(main, ["sanity", arguments[0], str(explained), *arguments[1:]])
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (explained / "sanity").exists()


def test_changed_checkpoint_or_missing_record_is_refused(explained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(explained, out)
    record = json.loads((out / "run.json").read_text())
    record["model"]["checkpoint_sha256"]["0"] = "0" * 64
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(AnalysisInputError, match="run.json: the checkpoints in .* changed since the explain run"):
        reopen_run(out)
    (out / "run.json").unlink()
    with pytest.raises(AnalysisInputError, match="run.json: missing; .* is not an nnxai explain output folder"):
        reopen_run(out)


def test_gradcampp_single_maps_are_checked_on_all_channels(run):
    table = randomization_check(run, select_instances(run), ["gradcampp"], independent=False)
    final = table[(table.experiment == CASCADING) & (table.step == table.step.max())]
    assert set(final.channel) == {"all"} and final.spearman_abs.abs().max() < 0.3
    # the stored map (OUT/<case>/gradcampp/<id>.nii.gz) is one map: deletion changes all channels
    curves = deletion_check(run, select_instances(run, max_instances=1), ["gradcampp"], [0, 10, 30], seeds=2)
    areas = deletion_areas(curves)
    assert areas.channel.tolist() == ["all"] and areas.area_between.item() > 0.1
