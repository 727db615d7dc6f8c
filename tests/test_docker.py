"""The Docker image, checked without a Docker engine.

hadolint and shellcheck lint the Dockerfile and its entry point; the Dockerfile's own instructions
(WORKDIR, COPY through .dockerignore, the RUN steps that install and link, ENV, ENTRYPOINT,
HEALTHCHECK) are replayed into a fresh virtual environment and a scratch folder standing in for the
image's file system; the README's docker commands are the strings checked here, and each one's
container command is checked against the replayed image.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import nnxai

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
README = REPO / "README.md"
BIN = Path(sys.executable).parent

# The README's docker commands, verbatim (test_readme_shows_exactly_the_checked_docker_commands).
IMAGE = "nnxai"
MOUNT = '-v "$PWD/data":/data'
EXPLAIN = ("nnxai explain -i /data/nnUNet_raw/Dataset901_MSPhantom/imagesTs -o /data/explanations "
           "-d 901 -tr nnUNetTrainerWML -f 0")
README_COMMANDS = [
    f"docker build -t {IMAGE} .",
    f"docker run --rm {MOUNT} {IMAGE} nnxai convert phantom /data/nnUNet_raw",
    f"docker run --rm --shm-size=8g {MOUNT} {IMAGE} nnUNetv2_plan_and_preprocess -d 901 --verify_dataset_integrity",
    f"docker run --rm --gpus all --shm-size=8g {MOUNT} {IMAGE} nnUNetv2_train 901 3d_fullres 0 -tr nnUNetTrainerWML",
    f"docker run --rm --gpus all --shm-size=8g {MOUNT} {IMAGE} {EXPLAIN} "
    "--gt /data/nnUNet_raw/Dataset901_MSPhantom/labelsTs",
    f"docker run --rm --shm-size=8g {MOUNT} {IMAGE} nnUNetv2_train 901 3d_fullres 0 -tr nnUNetTrainerWML -device cpu",
    f"docker run --rm --shm-size=8g {MOUNT} {IMAGE} {EXPLAIN} -device cpu",
    f'docker run --rm --user "$(id -u):$(id -g)" {MOUNT} {IMAGE} nnxai convert phantom /data/nnUNet_raw',
    f"docker run --rm {IMAGE} --version",
]
DOCKER_RUN_OPTIONS_WITH_VALUE = {"-v", "--gpus", "--user", "-e"}
# RUN steps that change the system's user database; they cannot be replayed outside a container.
SYSTEM_ONLY_COMMANDS = {"useradd", "chown"}


@dataclass
class Instruction:
    stage: int  # -1 before the first FROM
    keyword: str
    arguments: str


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The Dockerfile's instructions with continuation lines joined and comments dropped."""
    instructions, stage, pending = [], -1, ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, arguments = (pending + text).partition(" ")
        pending = ""
        stage += keyword.upper() == "FROM"
        instructions.append(Instruction(stage, keyword.upper(), arguments.strip()))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def environment_of(instructions: list[Instruction]) -> dict[str, str]:
    return dict(item.split("=", 1) for i in instructions if i.keyword == "ENV" for item in shlex.split(i.arguments))


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides.

    (fnmatch's `*` also crosses `/`, Docker's does not: the same for the top-level names used here.)"""
    parents = Path(relative).parts
    candidates = ["/".join(parents[: n + 1]) for n in range(len(parents))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        alternatives = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            ignored = not negated
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@dataclass
class ReplayedImage:
    """The final stage replayed: `root` stands for the image's /, `venv` for its Python environment."""
    root: Path
    venv: Path
    instructions: list[Instruction]
    env: dict[str, str] = field(default_factory=dict)

    def inside(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def run(self, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run `command` as the image's ENTRYPOINT would get it (`docker run IMAGE command...`)."""
        (entrypoint,) = exec_form(self.instructions, "ENTRYPOINT")
        return subprocess.run([entrypoint, *command], cwd=self.inside(last_value(self.instructions, "WORKDIR")),
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, *arguments: str) -> subprocess.CompletedProcess:
        """Run Python code with the image's interpreter and environment."""
        return subprocess.run([self.venv / "bin" / "python", "-c", code, *arguments], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=300)


def exec_form(instructions: list[Instruction], keyword: str) -> list[str]:
    """Arguments of an exec-form (JSON array) instruction; HEALTHCHECK's follow its CMD."""
    arguments = last_value(instructions, keyword)
    return json.loads(arguments[arguments.index("["):])


def last_value(instructions: list[Instruction], keyword: str) -> str:
    return [i.arguments for i in final_stage(instructions) if i.keyword == keyword][-1]


def prefix_absolute_paths(text: str, root: Path) -> str:
    """Put `root` in front of every absolute path in a shell command or ENV value."""
    return re.sub(r"""(?:^|(?<=[\s"'=:]))/(?=\w)""", f"{root}/", text)


def offline(segment: str, wheels: Path) -> str:
    """pip steps with everything taken from the environment (or `wheels`): no index, no isolated build."""
    segment = re.sub(r"\bpip install\b", f"pip install --no-index --find-links {wheels}", segment)
    return re.sub(r"\bpip wheel\b", "pip wheel --no-index --no-build-isolation", segment)


# pip never counts an installed `argparse` (a dependency of batchgenerators' unittest2) as satisfying a
# requirement, taking it for the standard library's: offline it must come as a wheel.
PIP_IGNORES_INSTALLED = ("argparse",)


def wheels_of_installed(names: tuple[str, ...], folder: Path) -> Path:
    """Repack installed distributions as wheels (their RECORDed files) for an offline pip."""
    folder.mkdir()
    for name in names:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        wheel = folder / f"{name}-{distribution.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for file in distribution.files:
                if "__pycache__" not in file.parts:
                    archive.write(file.locate(), str(file))
    return folder


def fresh_venv(folder: Path) -> Path:
    """A new virtual environment that sees this one's installed packages except nnxai itself.

    It stands for the base image, which brings torch (and, here, the other dependencies, so that no
    download is needed); nnU-Net's console scripts are placed in its bin as pip would install them.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    provided = folder / "provided-by-base-image"
    provided.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(("nnxai", "__editable__")) and entry.suffix != ".pth":
            (provided / entry.name).symlink_to(entry)
    (purelib / "provided-by-base-image.pth").write_text(f"{provided}\n")
    for entry_point in importlib.metadata.distribution("nnunetv2").entry_points.select(group="console_scripts"):
        module, function = entry_point.value.split(":")
        script = folder / "bin" / entry_point.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        script.chmod(0o755)
    return folder


def copy_into(source: Path, destination: Path, chmod: str | None, patterns: list[str] | None) -> None:
    """COPY semantics: a folder's contents (minus .dockerignore'd paths from the context) into destination."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for file in files:
        relative_to_source = file.relative_to(source) if source.is_dir() else Path(file.name)
        if patterns is not None and dockerignored(str(file.relative_to(REPO)), patterns):
            continue
        target = destination / relative_to_source if (source.is_dir() or destination.is_dir()) else destination
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
        if chmod:
            target.chmod(int(chmod, 8))


def replay(instructions: list[Instruction], scratch: Path) -> ReplayedImage:
    """Replay every stage's WORKDIR/COPY/RUN into scratch folders; RUN steps use the fresh venv."""
    venv = fresh_venv(scratch / "venv")
    wheels = wheels_of_installed(PIP_IGNORES_INSTALLED, scratch / "wheels-for-offline-pip")
    patterns = dockerignore_patterns()
    last = max(i.stage for i in instructions)
    image = ReplayedImage(scratch / "image", venv, instructions)
    names, workdir = {}, "/"
    for instruction in instructions:
        if instruction.stage < 0:
            continue
        root = image.root if instruction.stage == last else scratch / f"stage-{instruction.stage}"
        if instruction.keyword == "FROM":
            alias = re.search(r"\bAS (\w+)", instruction.arguments, re.IGNORECASE)
            names[alias.group(1) if alias else str(instruction.stage)] = root
            workdir, environment = "/", {}
        elif instruction.keyword == "ENV":
            environment.update({k: prefix_absolute_paths(v, root)
                                for k, v in environment_of([instruction]).items()})
        elif instruction.keyword == "WORKDIR":
            workdir = instruction.arguments
            (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            words = shlex.split(instruction.arguments)
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
            *sources, destination = [w for w in words if not w.startswith("--")]
            base = names[flags["from"]] if "from" in flags else REPO
            target = root / workdir.lstrip("/") / destination if not destination.startswith("/") \
                else root / destination.lstrip("/")
            for source in sources:
                copy_into(base / source.lstrip("/"), target, flags.get("chmod"), None if "from" in flags else patterns)
        elif instruction.keyword == "RUN":
            env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(scratch), **environment}
            for segment in instruction.arguments.split("&&"):
                if segment.split()[0] in SYSTEM_ONLY_COMMANDS:
                    continue
                command = offline(prefix_absolute_paths(segment.strip(), root), wheels)
                result = subprocess.run(["bash", "-euc", command], cwd=root / workdir.lstrip("/"), env=env,
                                        capture_output=True, text=True, timeout=600)
                assert result.returncode == 0, f"{segment.strip()}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    image.env = {"PATH": f"{image.inside('/usr/local/bin')}:{venv / 'bin'}:/usr/bin:/bin",
                 "HOME": str(scratch), **environment}
    return image


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> ReplayedImage:
    return replay(dockerfile_instructions(), tmp_path_factory.mktemp("image"))


def linter(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}:{os.environ.get('PATH', '')}")
    assert found, f"{name} is missing: install the test extra (pip install -e '.[test]')"
    return found


def test_hadolint_reports_nothing():
    result = subprocess.run([linter("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_entrypoint_passes_shellcheck():
    result = subprocess.run([linter("shellcheck"), str(REPO / "docker" / "entrypoint.sh")],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_base_image_is_a_cuda_runtime_torch_that_nnunet_accepts():
    (base_arg,) = [i.arguments for i in dockerfile_instructions() if i.keyword == "ARG" and i.stage == -1]
    tag = base_arg.split("=", 1)[1]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", tag)
    assert match, tag
    for package in ("nnunetv2", "nnxai"):
        (torch_requirement,) = [Requirement(r) for r in importlib.metadata.requires(package)
                                if Requirement(r).name == "torch" and not Requirement(r).marker]
        assert torch_requirement.specifier.contains(match.group(1)), (package, str(torch_requirement))


def test_final_stage_has_no_sources_or_build_tools():
    final = final_stage(dockerfile_instructions())
    copies = [shlex.split(i.arguments) for i in final if i.keyword == "COPY"]
    from_context = [words[-2] for words in copies if not any(w.startswith("--from=") for w in words)]
    assert from_context == ["docker/entrypoint.sh"]
    assert not [i for i in final if i.keyword == "RUN" and re.search(r"apt-get|apk |gcc|build-essential", i.arguments)]
    user = last_value(final, "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0


def test_dockerignore_sends_only_what_is_copied():
    patterns = dockerignore_patterns()
    for kept in ("pyproject.toml", "README.md", "nnxai/nnunet/checkpoint.py", "trainers/__init__.py",
                 "dataset_conversion/__init__.py", "docker/entrypoint.sh"):
        assert not dockerignored(kept, patterns), kept
    for left_out in (".venv/bin/python", ".git/HEAD", "tests/test_docker.py", "nnxai/__pycache__/model.cpython-311.pyc",
                     "demo_output/report.html", "Dockerfile"):
        assert dockerignored(left_out, patterns), left_out


def test_install_steps_give_an_installed_nnxai_with_its_trainers(image):
    located = image.python("import nnxai, trainers; print(nnxai.__file__); print(trainers.__file__)")
    assert located.returncode == 0, located.stderr
    nnxai_file, trainers_file = map(Path, located.stdout.split())
    assert image.venv in nnxai_file.parents and image.venv in trainers_file.parents  # the wheel, not the repo
    linked = image.inside("/opt/nnxai/trainers")
    assert Path(image.env["nnUNet_extTrainer"]) == linked and linked.resolve() == trainers_file.parent
    assert sorted(p.name for p in linked.glob("*.py")) == sorted(p.name for p in (REPO / "trainers").glob("*.py"))
    for folder in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert Path(image.env[folder]).parent == image.inside("/data")
    assert image.inside("/data").is_dir() and not image.inside("/tmp/wheels").exists()


def test_entrypoint_dispatches_nnxai_and_nnunet_commands(image):
    version = f"nnxai, version {nnxai.__version__}"
    assert image.run("nnxai", "--version").stdout.strip() == version
    assert image.run("--version").stdout.strip() == version
    healthcheck = exec_form(image.instructions, "HEALTHCHECK")
    assert healthcheck == ["nnxai", "--version"] and image.run(*healthcheck).returncode == 0
    assert exec_form(image.instructions, "CMD") == ["nnxai", "--help"]
    assert "Usage: nnxai" in image.run().stdout  # no command at all: the same help
    predict = image.run("nnUNetv2_predict", "-h")
    assert predict.returncode == 0 and "usage: nnUNetv2_predict" in predict.stdout
    unknown = image.run("nnunetv2_train", "1")
    assert unknown.returncode == 127 and "unknown command 'nnunetv2_train'" in unknown.stderr


def readme_docker_commands() -> list[str]:
    section = README.read_text().split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    fenced = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
              for line in block.splitlines()]
    inline = re.findall(r"`(docker [^`]+)`", section)
    return [c for c in fenced + inline if c.startswith("docker ")]


def container_command(command: str) -> tuple[list[str], list[str]]:
    """(docker run options, the command after the image name)."""
    words = shlex.split(command)
    assert words[:2] == ["docker", "run"], command
    options, index = [], 2
    while words[index].startswith("-"):
        takes_value = words[index] in DOCKER_RUN_OPTIONS_WITH_VALUE
        options += words[index:index + 1 + takes_value]
        index += 1 + takes_value
    assert words[index] == IMAGE, command
    return options, words[index + 1:]


def test_readme_shows_exactly_the_checked_docker_commands():
    assert sorted(readme_docker_commands()) == sorted(README_COMMANDS)
    assert README_COMMANDS[0] == f"docker build -t {IMAGE} ."


# Asks the image's Python, in one process (one import of torch and nnU-Net), for each program's
# `-h` text, called through its console-script entry point, and for nnU-Net's trainer lookup messages.
PROBE = """
import contextlib, io, json, sys, traceback
from importlib.metadata import entry_points
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
request, answer = json.loads(sys.argv[1]), {"helps": {}, "trainers": {}}
for trainer in request["trainers"]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            recursive_find_trainer_class_by_name(trainer)
        except Exception:
            print(traceback.format_exc())
    answer["trainers"][trainer] = out.getvalue()
scripts = entry_points(group="console_scripts")
for program in request["programs"]:
    sys.argv = [*program, "-h"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            scripts[program[0]].load()()
        except SystemExit as exit:
            print(f"exit code {exit.code or 0}")
    answer["helps"][" ".join(program)] = out.getvalue()
print(json.dumps(answer))
"""
# Programs that pick a device: the README runs them either with `--gpus all` or with `-device cpu`.
DEVICE_PROGRAMS = {("nnUNetv2_train",), ("nnxai", "explain")}


def program_of(inside: list[str]) -> tuple[str, ...]:
    """The program and subcommands: the leading words that are neither options, paths nor numbers."""
    program = []
    for word in inside:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", word):
            break
        program.append(word)
    return tuple(program) or ("nnxai",)  # options alone go to nnxai (the entry point's rule)


def readme_trainers() -> set[str]:
    return {words[words.index("-tr") + 1] for words in map(shlex.split, README_COMMANDS) if "-tr" in words}


@pytest.fixture(scope="module")
def probed(image) -> dict:
    programs = sorted({program_of(container_command(c)[1]) for c in README_COMMANDS[1:]})
    result = image.python(PROBE, json.dumps({"programs": programs, "trainers": sorted(readme_trainers())}))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", README_COMMANDS[1:], ids=[f"readme-{n}" for n in range(1, len(README_COMMANDS))])
def test_readme_docker_commands_fit_the_image(probed, command):
    options, inside = container_command(command)
    assert {options[i + 1].rsplit(":", 1)[1] for i, o in enumerate(options) if o == "-v"} <= {"/data"}
    assert all(word.startswith("/data/") for word in inside if word.startswith("/"))
    program = program_of(inside)
    if program[:2] in DEVICE_PROGRAMS:
        on_cpu = "-device" in inside and inside[inside.index("-device") + 1] == "cpu"
        assert ("--gpus" in options) != on_cpu and "--shm-size=8g" in options
    else:
        assert "--gpus" not in options
    helped = probed["helps"][" ".join(program)]
    assert helped.endswith("exit code 0\n"), helped
    for option in (word for word in inside if word.startswith("-")):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helped), (option, program)


def test_readme_trainer_is_found_through_the_images_nnunet_ext_trainer(image, probed):
    for trainer in readme_trainers():
        assert f"Using trainer '{trainer}' from: {image.env['nnUNet_extTrainer']}" in probed["trainers"][trainer]
