"""A model folder cannot run code: names in plans.json, dataset.json and the checkpoint are allow-listed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nnxai.cli import main
from nnxai.nnunet.model import ModelError, load_model
from tests.experiment_data import explained_cohort
from tests.fake_model import write_case, write_model_folder

PAYLOAD_MODULE = "nnxai_test_payload"


def edit_plans(folder: Path, edit) -> None:
    path = folder / "plans.json"
    plans = json.loads(path.read_text())
    edit(plans, plans["configurations"]["3d_fullres"])
    path.write_text(json.dumps(plans))


@pytest.fixture
def payload(tmp_path, monkeypatch) -> Path:
    """An importable module that creates a marker file when imported: proof that a name was imported."""
    marker = tmp_path / "imported"
    source = tmp_path / "payload_module"
    source.mkdir()
    (source / f"{PAYLOAD_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self, *args, **kwargs):\n        super().__init__()\n"
    )
    monkeypatch.syspath_prepend(str(source))
    monkeypatch.delitem(sys.modules, PAYLOAD_MODULE, raising=False)
    return marker


def test_shell_command_as_nonlinearity_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "owned"
    model = write_model_folder(tmp_path / "model")

    def shell(_plans, configuration):
        kwargs = configuration["architecture"]["arch_kwargs"]
        kwargs.update(nonlin="os.system", nonlin_kwargs={"command": f"touch {marker}"})
    edit_plans(model, shell)
    with pytest.raises(ModelError) as refusal:
        load_model(model)
    message = refusal.value.message
    assert "\n" not in message and str(model / "plans.json") in message
    assert "architecture.arch_kwargs.nonlin = 'os.system'" in message and "--trust-model" in message
    assert not marker.exists()
    with pytest.raises(Exception):
        load_model(model, trust_checkpoint=True)  # trusted: nnU-Net builds it, and the payload is real and runs
    assert marker.exists()


@pytest.mark.parametrize("where", ["network_class_name", "norm_op"])
def test_dotted_names_outside_the_allowed_packages_are_not_imported(tmp_path, payload, where):
    model = write_model_folder(tmp_path / "model")

    def point_to_payload(_plans, configuration):
        architecture = configuration["architecture"]
        if where == "network_class_name":
            architecture["network_class_name"] = f"{PAYLOAD_MODULE}.Net"
        else:
            architecture["arch_kwargs"]["norm_op"] = f"{PAYLOAD_MODULE}.Net"
    edit_plans(model, point_to_payload)
    with pytest.raises(ModelError, match=f"{where} = '{PAYLOAD_MODULE}.Net' is not a"):
        load_model(model)
    assert not payload.exists() and PAYLOAD_MODULE not in sys.modules
    with pytest.raises(Exception):
        load_model(model, trust_checkpoint=True)
    assert payload.exists()  # what the check prevents: nnU-Net imports whatever module plans.json names


@pytest.mark.parametrize("value", ["torch.nn.functional.os.system", "torch.nn.functional.relu",
                                   "torch.nn.modules.conv.Conv3d.__init__", "torch.optim.SGD"])
def test_layer_names_must_be_torch_nn_module_classes(tmp_path, value):
    model = write_model_folder(tmp_path / "model")
    edit_plans(model, lambda _p, c: c["architecture"]["arch_kwargs"].update(nonlin=value))
    with pytest.raises(ModelError, match=r"nonlin = .* is not a layer class of torch.nn"):
        load_model(model)


def nnunet_named(plans: dict, configuration: dict, key: str, value: str) -> None:
    if key in ("image_reader_writer", "label_manager"):
        plans[key] = value
    elif key == "normalization_schemes":
        configuration[key][1] = value
    else:
        configuration[key] = value


# Each key nnU-Net resolves by name in its own packages, with a name found there that is of another kind
# (a callable nnU-Net would call with arguments from the same file) and one found nowhere.
NNUNET_NAMES = [
    ("preprocessor_name", "ZScoreNormalization", "configurations.3d_fullres.preprocessor_name"),
    ("normalization_schemes", "DefaultPreprocessor", "configurations.3d_fullres.normalization_schemes[1]"),
    ("resampling_fn_data", "maybe_mkdir_p", "configurations.3d_fullres.resampling_fn_data"),
    ("resampling_fn_seg", "ZScoreNormalization", "configurations.3d_fullres.resampling_fn_seg"),
    ("resampling_fn_probabilities", "os.system", "configurations.3d_fullres.resampling_fn_probabilities"),
    ("image_reader_writer", "LabelManager", "image_reader_writer"),
    ("label_manager", "SimpleITKIO", "label_manager"),
]


@pytest.mark.parametrize("key,value,named", NNUNET_NAMES)
def test_names_nnunet_looks_up_must_be_of_their_kind(tmp_path, key, value, named):
    model = write_model_folder(tmp_path / "model")
    edit_plans(model, lambda p, c: nnunet_named(p, c, key, value))
    with pytest.raises(ModelError) as refusal:
        load_model(model)
    assert f"plans.json: {named} = {value!r} is not an nnU-Net" in refusal.value.message


def test_reader_writer_override_in_dataset_json_is_checked(tmp_path):
    model = write_model_folder(tmp_path / "model")
    dataset = json.loads((model / "dataset.json").read_text())
    (model / "dataset.json").write_text(json.dumps({**dataset, "overwrite_image_reader_writer": "DefaultPreprocessor"}))
    with pytest.raises(ModelError, match="dataset.json: overwrite_image_reader_writer = 'DefaultPreprocessor'"):
        load_model(model)
    (model / "dataset.json").write_text(json.dumps({**dataset, "overwrite_image_reader_writer": "NibabelIO"}))
    assert load_model(model).dataset_json["overwrite_image_reader_writer"] == "NibabelIO"


@pytest.mark.parametrize("trainer", ["os", "join", "nnUNetTrainer.__init__", "NoSuchTrainer"])
def test_checkpoint_trainer_name_must_be_a_trainer(tmp_path, trainer):
    model = write_model_folder(tmp_path / "model")
    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    torch.save({**checkpoint, "trainer_name": trainer}, path)
    with pytest.raises(ModelError, match=f"checkpoint_final.pth: trainer_name = '{trainer}' is not an nnU-Net trainer"):
        load_model(model)


def test_nnunet_own_names_and_older_spellings_load(tmp_path):
    model = write_model_folder(tmp_path / "model")

    def other_allowed(plans, configuration):
        configuration["architecture"]["arch_kwargs"].update(nonlin="torch.nn.modules.activation.ReLU",
                                                            conv_op="torch.nn.Conv3d")
        configuration["normalization_schemes"] = ["CTNormalization", "RescaleTo01Normalization"]
        configuration["resampling_fn_data"] = "resample_data_or_seg_to_spacing"
        plans["image_reader_writer"] = "NibabelIOWithReorient"
    edit_plans(model, other_allowed)
    loaded = load_model(model)
    assert type(loaded.networks[0].encoder.stages[0][0].convs[0].nonlin).__name__ == "ReLU"


@pytest.fixture(scope="module")
def tampered_run(tmp_path_factory) -> Path:
    """An explained cohort whose model folder's plans.json was then edited to run a shell command."""
    root = tmp_path_factory.mktemp("tampered")
    explained_cohort(root)
    edit_plans(root / "model", lambda _p, c: c["architecture"]["arch_kwargs"].update(
        nonlin="os.system", nonlin_kwargs={"command": f"touch {root / 'owned'}"}))
    return root


@pytest.mark.parametrize("command", [
    ["explain", "-i", "{root}/images", "-o", "{root}/again", "-m", "{root}/model", "-device", "cpu"],
    ["layers", "-m", "{root}/model"],
    ["compare", "--gt", "{root}/labels", "m={root}/model", "gt={root}/labels", "-o", "{root}/cmp",
     "--images", "{root}/images", "-device", "cpu"],
    ["experiment", "context", "{root}/out", "-device", "cpu"],
    ["sanity", "gradcheck", "{root}/out", "--device", "cpu"],
])
def test_every_command_refuses_the_model_in_one_line(tampered_run, command):
    root = tampered_run
    result = CliRunner().invoke(main, [part.format(root=root) for part in command])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "plans.json: configurations.3d_fullres.architecture.arch_kwargs.nonlin" in lines[0]
    assert not (root / "owned").exists()
    assert not any((root / name).exists() for name in ("again", "cmp"))


def test_trust_model_and_its_old_name_both_lift_the_check(tmp_path):
    model = write_model_folder(tmp_path / "model")
    write_case(tmp_path / "images", "case_0", 0)
    edit_plans(model, lambda _p, c: c["architecture"]["arch_kwargs"].update(nonlin="torch.nn.functional.relu"))
    refused = CliRunner().invoke(main, ["layers", "-m", str(model)])
    assert refused.exit_code != 0 and "--trust-model" in refused.output
    for flag in ("--trust-model", "--trust-checkpoint"):
        trusted = CliRunner().invoke(main, ["layers", "-m", str(model), flag])
        assert "is not a layer class" not in trusted.output  # past the check: nnU-Net built (or failed) on its own
