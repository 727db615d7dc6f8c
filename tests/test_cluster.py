"""Clusters: shards as nnUNetv2_predict splits, resuming a killed shard, `nnxai merge`, the SLURM script, bad input."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

import nnxai.explain.cohort
from nnxai.cli import main
from nnxai.explain.cases import find_cases, shard
from nnxai.explain.cohort import explain_cohort
from nnxai.explain.merge import merge_outputs
from nnxai.explain.output import CASE_TABLE
from nnxai.explain.settings import ExplainSettings
from nnxai.nnunet.model import load_model
from tests.fake_model import write_case, write_model_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm_explain.sh"
BIN = Path(sys.executable).parent
SETTINGS = ExplainSettings(samples=1, use_mirroring=False)
CASES = [f"case_{i}" for i in range(5)]
PARTS = 3  # parts: [case_0, case_3], [case_1, case_4], [case_2]


class Killed(BaseException):
    """Stands for the signal that ends a shard (not an Exception, so nothing inside explain catches it)."""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Parts 0 and 2 finished; part 1 killed while writing its first case (case_1), so case_4 never started."""
    root = tmp_path_factory.mktemp("cluster")
    model = load_model(write_model_folder(root / "model"))
    for i, case in enumerate(CASES):
        write_case(root / "images", case, seed=i)
    out = root / "out"
    runs = {part: explain_cohort(model, root / "images", out, SETTINGS, num_parts=PARTS, part_id=part, progress=False)
            for part in (0, 2)}
    write_volume = nnxai.explain.cohort.write_volume

    def killed_after_first_file(*args, **kwargs):
        write_volume(*args, **kwargs)
        raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nnxai.explain.cohort, "write_volume", killed_after_first_file)
        with pytest.raises(Killed):
            explain_cohort(model, root / "images", out, SETTINGS, num_parts=PARTS, part_id=1, progress=False)
    return root, model, runs


def case_tables(out: Path, cases: list[str]) -> pd.DataFrame:
    return pd.concat([pd.read_csv(out / case / CASE_TABLE) for case in cases], ignore_index=True)


@pytest.mark.parametrize("names", [CASES, ["b", "a-1", "a", "a_b", "A", "case_10", "case_2"]])
def test_parts_are_disjoint_complete_and_split_as_nnunet_predict(tmp_path, names):
    for name in names:
        for channel in range(2):
            (tmp_path / f"{name}_{channel:04d}.nii.gz").touch()
    cases = list(find_cases(tmp_path, ".nii.gz", 2))
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False)
    predictor.dataset_json = {"file_ending": ".nii.gz"}
    all_lists = create_lists_from_splitted_dataset_folder(str(tmp_path), ".nii.gz", num_processes=1)
    for num_parts in range(1, len(names) + 2):
        parts = [shard(cases, num_parts, part) for part in range(num_parts)]
        assert sorted(sum(parts, [])) == sorted(names)  # complete and, with the count, disjoint
        assert sum(len(p) for p in parts) == len(names)
        for part_id, part in enumerate(parts):
            lists, _, _ = predictor._manage_input_and_output_lists(all_lists, None, part_id=part_id,
                                                                   num_parts=num_parts)
            assert part == [Path(files[0]).name[: -len("_0000.nii.gz")] for files in lists]


def test_killed_shard_is_reported_and_a_rerun_does_only_what_is_missing(killed_run, monkeypatch, tmp_path):
    root, model, runs = killed_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    assert runs[0].done == ["case_0", "case_3"] and runs[2].done == ["case_2"]
    assert (out / ".case_1.partial" / "prediction.nii.gz").is_file() and not (out / "case_1").exists()

    report = merge_outputs(out)
    assert (report.cases, report.missing, report.partial) == (CASES, ["case_1", "case_4"], ["case_1"])
    finished = ["case_0", "case_2", "case_3"]
    pd.testing.assert_frame_equal(pd.read_csv(out / CASE_TABLE), case_tables(out, finished))
    assert report.instances == len(case_tables(out, finished)) > 0

    before = {case: (out / case / CASE_TABLE).stat().st_mtime_ns for case in finished}
    explained = []
    explain_case = nnxai.explain.cohort.explain_case

    def counting(model, case, *args, **kwargs):
        explained.append(case)
        return explain_case(model, case, *args, **kwargs)

    monkeypatch.setattr(nnxai.explain.cohort, "explain_case", counting)
    reruns = [explain_cohort(model, root / "images", out, SETTINGS, num_parts=PARTS, part_id=part, progress=False)
              for part in range(PARTS)]
    assert explained == ["case_1", "case_4"]
    assert [r.skipped for r in reruns] == [["case_0", "case_3"], [], ["case_2"]]
    assert {case: (out / case / CASE_TABLE).stat().st_mtime_ns for case in finished} == before
    assert not (out / ".case_1.partial").exists()

    report = merge_outputs(out)
    assert (report.finished, report.missing, report.partial) == (CASES, [], [])
    pd.testing.assert_frame_equal(pd.read_csv(out / CASE_TABLE), case_tables(out, CASES))


def test_merge_command_exit_status_and_messages(killed_run, tmp_path):
    root, _, _ = killed_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    runner = CliRunner()
    result = runner.invoke(main, ["merge", str(out)])
    assert result.exit_code == 1
    assert f"{out}: 3 of 5 case(s) finished" in result.output
    assert "missing 2 case(s): case_1, case_4" in result.output
    assert "half-written (a run stopped while writing them): case_1" in result.output
    assert runner.invoke(main, ["merge", str(out), "--allow-missing"]).exit_code == 0
    assert pd.read_csv(out / CASE_TABLE)["case"].unique().tolist() == ["case_0", "case_2", "case_3"]

    other = tmp_path / "other_images"
    shutil.copytree(root / "images", other)
    write_case(other, "case_5", seed=5)
    result = runner.invoke(main, ["merge", str(out), "-i", str(other), "--allow-missing"])
    assert result.exit_code == 0 and "missing 3 case(s): case_1, case_4, case_5" in result.output


def test_merge_refuses_folders_it_cannot_read(killed_run, tmp_path):
    root, _, _ = killed_run
    runner = CliRunner()
    result = runner.invoke(main, ["merge", str(tmp_path)])
    assert result.exit_code == 1 and f"{tmp_path / 'run.json'}: missing; " in result.output
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    record = (out / "run.json").read_text().replace(str(root / "images"), str(tmp_path / "moved"))
    (out / "run.json").write_text(record)
    result = runner.invoke(main, ["merge", str(out)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'moved'}: input folder named in {out / 'run.json'} not found; give it with -i" in result.output


def invoke_explain(*args: str):
    return CliRunner().invoke(main, ["explain", "-i", "images", "--samples", "1", *args])


def test_cuda_asked_without_a_gpu_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke_explain("-o", str(tmp_path / "out"), "-m", "model", "-device", "cuda")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: -device cuda: no CUDA GPU is available here (use -device cpu)"


@pytest.mark.parametrize("where, message", [
    ("file", "exists and is not a folder"),
    ("file/out", "cannot create the output folder (Not a directory)"),
    ("readonly", "output folder is not writable"),
])
def test_output_that_cannot_be_written_is_refused_before_the_model_loads(monkeypatch, tmp_path, where, message):
    (tmp_path / "file").touch()
    (tmp_path / "readonly").mkdir()
    access = os.access
    refused = tmp_path / "readonly"
    monkeypatch.setattr(os, "access", lambda path, mode: not (Path(path) == refused and mode & os.W_OK)
                        and access(path, mode))
    out = tmp_path / where
    result = invoke_explain("-o", str(out), "-m", str(tmp_path / "no_model"), "-device", "cpu")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {out}: {message}"  # not the missing model: nothing was loaded


def test_dataset_without_nnunet_results_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("nnUNet_results", raising=False)
    result = invoke_explain("-o", str(tmp_path / "out"), "-d", "901", "-device", "cpu")
    assert result.exit_code == 2
    assert "-d needs the environment variable nnUNet_results" in result.output
    assert not (tmp_path / "out").exists()


def test_dataset_with_a_missing_nnunet_results_folder_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "no_results"))
    result = invoke_explain("-o", str(tmp_path / "out"), "-d", "901", "-device", "cpu")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"Error: -d looks for trained models in nnUNet_results={tmp_path / 'no_results'}, which is not a folder; "
        "point it at the folder nnUNetv2_train wrote, or give the model folder with -m")
    assert not (tmp_path / "out").exists()


def test_slurm_script_is_valid_bash_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0
    shellcheck = shutil.which("shellcheck", path=f"{BIN}:{os.environ.get('PATH', '')}")
    assert shellcheck, "shellcheck is missing: install the test extra (pip install -e '.[test]')"
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def fake_command(folder: Path, name: str, output: str = "") -> Path:
    """An executable that records its arguments, one per line, in folder/<name>.<n> and prints `output`."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f'#!/usr/bin/env bash\nn=$(find "{folder}" -name "{name}.*" | wc -l)\n'
                    f'printf "%s\\n" "$@" > "{folder}/{name}.$n"\nprintf "%s\\n" "$((100 + n)){output}"\n')
    path.chmod(0o755)
    return path


def recorded(folder: Path, name: str) -> list[list[str]]:
    return [(folder / f"{name}.{n}").read_text().splitlines() for n in range(len(list(folder.glob(f"{name}.*"))))]


def run_script(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": os.environ["PATH"], **env})


def test_slurm_submission_makes_an_array_and_a_merge_job_that_waits_for_it(tmp_path):
    calls = tmp_path / "calls"
    fake_command(calls, "sbatch", ";cluster")
    (tmp_path / "my images").mkdir()
    result = run_script("my images", "out dir", "-m", "model", "--gt", "labels", cwd=tmp_path, PARTS="3",
                        MAX_RUNNING="2", PATH=f"{calls}:{os.environ['PATH']}",
                        NNXAI="apptainer exec --nv nnxai.sif nnxai")
    assert result.returncode == 0, result.stderr
    images, out = tmp_path / "my images", tmp_path / "out dir"
    array_call, merge_call = recorded(calls, "sbatch")
    assert array_call == ["--parsable", "--array=0-2%2", f"--output={out}/slurm_logs/explain_%A_%a.log",
                          str(SCRIPT), str(images), str(out), "-m", "model", "--gt", "labels"]
    assert "--dependency=afterany:100" in merge_call
    wrap = next(a.removeprefix("--wrap=") for a in merge_call if a.startswith("--wrap="))
    assert (out / "slurm_logs").is_dir()
    assert "submitted explain array 100 (3 tasks) and merge job 101" in result.stdout

    fake_command(tmp_path / "bin", "apptainer")
    subprocess.run(["bash", "-c", wrap], check=True, env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert recorded(tmp_path / "bin", "apptainer") == [["exec", "--nv", "nnxai.sif", "nnxai", "merge", str(out)]]


def test_slurm_array_task_runs_its_part_on_a_gpu(tmp_path):
    fake = fake_command(tmp_path / "bin", "nnxai")
    task = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "2", "NNXAI": str(fake)}
    result = run_script("/data/images", "/data/out", "-m", "model", "-f", "0", **task)
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path / "bin", "nnxai") == [["explain", "-i", "/data/images", "-o", "/data/out",
                                                    "-device", "cuda", "-num_parts", "3", "-part_id", "1",
                                                    "-m", "model", "-f", "0"]]

    resubmitted_subset = {**task, "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "1",
                          "SLURM_ARRAY_TASK_MAX": "1"}
    result = run_script("/data/images", "/data/out", "-m", "model", **resubmitted_subset)
    assert result.returncode == 2 and "submit the whole array 0-N" in result.stderr
    assert len(recorded(tmp_path / "bin", "nnxai")) == 1


def test_slurm_submission_refuses_bad_input(tmp_path):
    calls = tmp_path / "calls"
    fake_command(calls, "sbatch")
    path = f"{calls}:{os.environ['PATH']}"
    zero_parts = run_script("images", "out", PARTS="0", PATH=path)
    assert zero_parts.stderr.strip() == "PARTS must be a positive whole number, got '0'"
    no_images = run_script(str(tmp_path / "none"), "out", PATH=path)
    assert (no_images.returncode, no_images.stderr.strip()) == (2, f"{tmp_path / 'none'}: no such input folder")
    assert run_script("only-one").returncode == 2
    assert not list(calls.glob("sbatch.*"))
