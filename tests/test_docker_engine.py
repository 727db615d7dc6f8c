"""The Docker image built and run by a real Docker engine (slow).

docker/build-without-hub.sh builds the image on a local Debian base with PyTorch from the package index
(Docker Hub is out of reach here; the default build is FROM the CUDA PyTorch image). Containers then run the README's pipeline on a mounted
folder as the image's non-root user: phantom cohort, nnU-Net planning, a short training with nnxai's
trainer, explanations on the CPU. Skipped, with the reason, where no Docker engine can be had.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import nnxai

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "docker" / "build-without-hub.sh"
NO_ENGINE_EXIT_CODE = 3  # the build script's "no Docker engine can be had here"
TAG = "nnxai:debian"
IMAGE_USER = 1000
DATASET = "/data/nnUNet_raw/Dataset901_MSPhantom"
TRAINER = "nnUNetTrainerWMLShort"
# Small enough for two cores: 8 phantom cases at 3 mm (6 to train, so nnU-Net's 5-fold split exists),
# one epoch of two iterations, one worker process; one noise sample, and the study's post-processing
# (components under 6 voxels dropped: this model predicts about 430 specks per case besides one blob).
SHORT_TRAINING = {"NNXAI_EPOCHS": "1", "NNXAI_ITERATIONS": "2", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
PIPELINE = {
    "convert": ["nnxai", "convert", "phantom", "/data/nnUNet_raw", "--cases", "8", "--spacing", "3"],
    "plan": ["nnUNetv2_plan_and_preprocess", "-d", "901", "-c", "3d_fullres", "-np", "1", "-npfp", "1",
             "--verify_dataset_integrity"],
    "train": ["nnUNetv2_train", "901", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
    "explain": ["nnxai", "explain", "-i", f"{DATASET}/imagesTs", "-o", "/data/explanations", "-d", "901",
                "-tr", TRAINER, "-f", "0", "-device", "cpu", "--gt", f"{DATASET}/labelsTs", "--samples", "1",
                "--disable_tta", "--min-size", "6"],
}


def engine_answers() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def image() -> str:
    engine_was_running = engine_answers()
    built = subprocess.run(["bash", str(BUILD_SCRIPT), TAG], capture_output=True, text=True, timeout=1700)
    if built.returncode == NO_ENGINE_EXIT_CODE:
        pytest.skip(built.stderr.strip().splitlines()[-1])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield TAG
    if not engine_was_running:  # the build script started it for this test
        os.kill(int(Path("/var/run/docker.pid").read_text()), signal.SIGTERM)


def data_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder to mount at /data that the container's user can write, and the `docker run` options for it."""
    data = tmp_path_factory.mktemp("docker-data")
    if os.geteuid() == 0:
        os.chown(data, IMAGE_USER, IMAGE_USER)  # as a user would own their data folder
        return data, []
    return data, ["--user", f"{os.getuid()}:{os.getgid()}"]  # the README's advice for other owners


def docker_run(image: str, *command: str, options: tuple[str, ...] = (), environment: dict[str, str] | None = None,
               timeout: float = 1200) -> subprocess.CompletedProcess:
    variables = [word for name, value in (environment or {}).items() for word in ("-e", f"{name}={value}")]
    return subprocess.run(["docker", "run", "--rm", "--shm-size=1g", *options, *variables, image, *command],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(image, tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    data, user = data_folder(tmp_path_factory)
    results = {}
    for step, command in PIPELINE.items():
        result = docker_run(image, *command, options=("-v", f"{data}:/data", *user),
                            environment=SHORT_TRAINING if step == "train" else None)
        assert result.returncode == 0, f"{step}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        results[step] = result
    return data, results


def test_image_prints_its_version(image):
    result = docker_run(image, "--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"nnxai, version {nnxai.__version__}")


def test_pipeline_explains_the_test_cases_with_the_trainer_found_in_the_image(pipeline):
    data, results = pipeline
    assert "Using trainer 'nnUNetTrainerWMLShort' from: /opt/nnxai/trainers" in results["train"].stdout
    model = data / "nnUNet_results" / "Dataset901_MSPhantom" / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    assert (model / "checkpoint_final.pth").is_file()
    test_cases = sorted(p.name.removesuffix(".nii.gz") for p in (data / DATASET[6:] / "labelsTs").glob("*.nii.gz"))
    assert len(test_cases) == 2
    assert "explained 2 case(s), skipped 0 finished, failed 0" in results["explain"].stdout
    explanations = data / "explanations"
    table = pd.read_csv(explanations / "instances.csv")
    assert sorted(set(table.case)) == test_cases and set(table.group) <= {"TP", "FP", "FN"}
    assert (table.group != "FP").any()  # every ground-truth lesion is listed, found (TP) or missed (FN)
    for row in table.itertuples():
        assert (explanations / row.case / "smoothgrad" / f"{row.instance_id:03d}_FLAIR.nii.gz").is_file()


def test_pipeline_outputs_belong_to_the_containers_user(pipeline):
    data, _ = pipeline
    owner = IMAGE_USER if os.geteuid() == 0 else os.getuid()
    written = list(data.rglob("*"))
    assert len(written) > 50
    assert {p.lstat().st_uid for p in written} == {owner}


def test_read_only_mount_stops_before_any_work(image, tmp_path_factory):
    data, user = data_folder(tmp_path_factory)
    for command in PIPELINE.values():
        result = docker_run(image, *command, options=("-v", f"{data}:/data:ro", *user), timeout=60)
        assert result.returncode == 1 and result.stdout == "", command
        assert result.stderr == (f"nnxai image: /data is mounted read-only (drop :ro from -v); {command[0]} writes "
                                 "its results there\n")
    assert list(data.iterdir()) == []
    assert docker_run(image, "nnxai", "explain", "--help", options=("-v", f"{data}:/data:ro")).returncode == 0


@pytest.mark.parametrize("environment, error", [
    ({}, "Error: -d looks for trained models in nnUNet_results=/data/nnUNet_results, which is not a folder; "
         "point it at the folder nnUNetv2_train wrote, or give the model folder with -m"),
    ({"nnUNet_results": ""}, "Error: -d needs the environment variable nnUNet_results (nnU-Net's trained models "
                             "folder); set it, or give the model folder with -m"),
], ids=["folder-missing", "variable-empty"])
def test_missing_nnunet_results_is_a_one_line_error_before_any_output(image, tmp_path_factory, environment, error):
    data, user = data_folder(tmp_path_factory)
    result = docker_run(image, *PIPELINE["explain"], options=("-v", f"{data}:/data", *user),
                        environment=environment, timeout=300)
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (2, error)
    assert list(data.iterdir()) == []
