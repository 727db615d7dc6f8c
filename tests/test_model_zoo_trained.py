"""A ResEnc model as users make it, with nnU-Net's own commands: nnUNetPlannerResEncM plans (shrunk for CPU),
a user's own trainer found only through nnUNet_extTrainer, nnUNetv2_train; then explained, checked and
analysed with nnxai's commands. One model, trained once for the module."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from dataset_conversion.nnunet_raw import write_splits
from nnxai.cli import main
from nnxai.demo import Demo
from nnxai.explain.reopen import reopen_run
from nnxai.nnunet.environment import NNUNET_FOLDERS
from nnxai.nnunet.model import ModelError, load_model, model_folder
from nnxai.nnunet.model_safety import find_trainer
from nnxai.nnunet.plans import write_small_plans
from nnxai.sanity.faithfulness import stored_maps
from tests.fake_nnunet import write_fake_fingerprint
from tests.torch_threads import one_torch_thread  # noqa: F401 (autouse)

pytestmark = pytest.mark.slow

DATASET_ID = 953
PLANS = "nnUNetResEncUNetMPlans"
CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainerUserShort"
# 32^3 cases and a 32^3 patch: every case is one sliding-window tile, so maps compare with plain autograd
SHAPE = PATCH = (32, 32, 32)
CASES = ["case_000", "case_001", "case_002", "case_003"]
EXPLAINED = "case_003"  # the validation case of fold 0
# 40 iterations segment the fake dataset's blobs in a few components (25 left dozens of voxel-sized ones)
TRAINING = {"NNXAI_EPOCHS": "2", "NNXAI_ITERATIONS": "20", "nnUNet_n_proc_DA": "0"}
USER_TRAINER = textwrap.dedent(f'''
    """A user's trainer, outside nnU-Net and nnxai: the short schedule on one torch thread, without nnU-Net's
    final validation."""
    import torch
    from trainers.nnUNetTrainerShort import nnUNetTrainerShort


    class {TRAINER}(nnUNetTrainerShort):
        def on_train_start(self) -> None:
            # nnUNetv2_train -device cpu sets one thread per core: an epoch took 5x longer on 2 busy cores
            torch.set_num_threads(1)
            super().on_train_start()

        def perform_actual_validation(self, save_probabilities: bool = False) -> None:
            self.print_to_log_file("final validation skipped")
''')


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """nnU-Net folders, the user's trainer folder as nnUNet_extTrainer, a trained model and its explain run."""
    root = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as environment:
        for name in NNUNET_FOLDERS:
            environment.setenv(name, str(root / name))
        environment.setenv("nnUNet_extTrainer", str(root / "user_trainers"))
        (root / "user_trainers").mkdir()
        (root / "user_trainers" / f"{TRAINER}.py").write_text(USER_TRAINER)
        preprocessed = write_fake_fingerprint(DATASET_ID, len(CASES), SHAPE)
        # the fingerprint is already there, so nnU-Net plans with the ResEnc M planner and preprocesses
        Demo.nnunet("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerResEncM",
                    "-c", CONFIGURATION, "-np", "1")
        write_small_plans(DATASET_ID, PLANS, PATCH, features=(8, 16, 32), convs_per_stage=1, source_plans=PLANS)
        write_splits(preprocessed.name, [{"train": CASES[:3], "val": [EXPLAINED]}])
        Demo.nnunet("nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-p", PLANS, "-tr", TRAINER,
                    "-device", "cpu", **TRAINING)
        images = root / "images"
        images.mkdir()
        for source in (root / "nnUNet_raw" / preprocessed.name / "imagesTr").glob(f"{EXPLAINED}_*.nii.gz"):
            (images / source.name).symlink_to(source)
        Demo.nnunet("nnUNetv2_predict", "-i", str(images), "-o", str(root / "predictions"), "-d", str(DATASET_ID),
                    "-c", CONFIGURATION, "-p", PLANS, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1",
                    "-nps", "1", "--disable_tta")
        explained = CliRunner().invoke(main, [
            "explain", "-i", str(images), "-o", str(root / "out"), "-d", str(DATASET_ID), "-p", PLANS, "-tr", TRAINER,
            "-f", "0", "--gt", str(root / "nnUNet_raw" / preprocessed.name / "labelsTr"), "--method",
            "smoothgrad,gradcampp", "--samples", "1", "--noise", "0", "--disable_tta", "-device", "cpu",
            "--min-size", "6"])  # the study's post-processing: a short-trained model's scattered voxels are no lesions
        assert explained.exit_code == 0, explained.output
        yield root


@pytest.fixture(scope="module")
def folder(zoo):
    return model_folder(str(DATASET_ID), CONFIGURATION, TRAINER, PLANS)


def test_resenc_planner_plans_train_a_residual_encoder_unet(zoo, folder):
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["experiment_planner_used"] == "nnUNetPlannerResEncM"
    architecture = plans["configurations"][CONFIGURATION]["architecture"]
    assert architecture["network_class_name"].endswith(".ResidualEncoderUNet")
    assert architecture["arch_kwargs"]["n_blocks_per_stage"] == [1, 1, 1]
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 2
    assert type(load_model(folder).networks[0]).__name__ == "ResidualEncoderUNet"


def test_layers_lists_resenc_stages_and_the_default_is_the_last_decoder_stage(zoo, folder):
    result = CliRunner().invoke(main, ["layers", "-m", str(folder)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:] if line.strip()}
    assert rows["encoder.stem"] == ["8", "1x1x1"]
    assert [rows[f"encoder.stages.{i}"][:2] for i in range(3)] == [["8", "1x1x1"], ["16", "2x2x2"], ["32", "4x4x4"]]
    assert rows["decoder.stages.1"] == ["8", "1x1x1", "(default)"]
    assert [name for name, row in rows.items() if "(default)" in row] == ["decoder.stages.1"]


def test_explained_segmentation_equals_nnunet_predict(zoo):
    def read(path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    theirs = read(zoo / "predictions" / f"{EXPLAINED}.nii.gz")
    ours = read(zoo / "out" / EXPLAINED / "prediction.nii.gz")
    assert theirs.any() and np.array_equal(theirs > 0, ours > 0)
    table = pd.read_csv(zoo / "out" / "instances.csv")
    assert (table.group == "TP").any()


def test_zero_noise_single_tile_maps_equal_autograd_of_the_network(zoo):
    run = reopen_run(zoo / "out")
    case_input = run.case_input(EXPLAINED)
    window = run.window()
    assert len(window.layout(SHAPE).tiles) == 1
    network = run.model.networks[0]
    tile = window.layout(SHAPE).tiles[0]
    weight = window.layout(SHAPE).tile_weight(tile)
    largest = pd.read_csv(zoo / "out" / "instances.csv").nlargest(3, "voxels").instance_id
    for instance_id in largest:
        mask = torch.as_tensor(case_input.mask(instance_id))
        x = case_input.data.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad((network(x[None])[0, 1] * weight * mask).sum(), x)
        stored = stored_maps(run, case_input, "smoothgrad", instance_id)
        np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-4, atol=1e-6 * np.abs(stored).max())
        assert np.abs(stored).max() > 0


def test_gradcampp_uses_the_default_layer(zoo):
    settings = json.loads((zoo / "out" / "run.json").read_text())["settings"]
    assert settings["layer"] == "decoder.stages.1"
    table = pd.read_csv(zoo / "out" / "instances.csv")
    for instance_id in table.instance_id:
        cam = sitk.GetArrayFromImage(sitk.ReadImage(str(zoo / "out" / EXPLAINED / "gradcampp"
                                                        / f"{instance_id:03d}.nii.gz")))
        assert cam.min() >= 0 and cam.max() > 0


def test_sanity_gradcheck_passes(zoo):
    result = CliRunner().invoke(main, ["sanity", "gradcheck", str(zoo / "out"), "--voxels", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(zoo / "out" / "sanity" / "gradcheck.csv")
    assert len(table) == 4 and (table.map_value.abs() > 0).all()
    assert table.relative_error.max() < 1e-3
    assert pd.read_csv(zoo / "out" / "sanity" / "gradcheck_verdict.csv").verdict.item() == "passes"


def test_rings_experiment_inside_shell_is_the_instances_mean_saliency(zoo):
    result = CliRunner().invoke(main, ["experiment", "rings", str(zoo / "out"), "--max-mm", "2", "--method",
                                       "smoothgrad"])
    assert result.exit_code == 0, result.output
    rings = pd.read_csv(zoo / "out" / "rings.csv")
    inside = rings[(rings.method == "smoothgrad") & (rings.shell_mm == 0)].set_index(["instance_id", "channel"])
    for row in pd.read_csv(zoo / "out" / "instances.csv").itertuples():
        for channel in ("FLAIR", "T1"):
            assert inside.loc[(row.instance_id, channel), "voxels"] == row.voxels
            assert inside.loc[(row.instance_id, channel), "mean"] == pytest.approx(
                getattr(row, f"smoothgrad_{channel}_mean"), rel=1e-5)


def test_user_trainer_is_accepted_through_nnunet_exttrainer_only(zoo, folder, monkeypatch):
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    trainer = find_trainer(TRAINER, checkpoint)
    assert trainer.__name__ == TRAINER and trainer.__module__ == TRAINER
    monkeypatch.delenv("nnUNet_extTrainer")
    with pytest.raises(ModelError) as refusal:
        load_model(folder)
    assert refusal.value.message == (f"{checkpoint}: trainer_name = '{TRAINER}' is not an nnU-Net trainer "
                                     "(searched nnU-Net's trainers and nnUNet_extTrainer)")
