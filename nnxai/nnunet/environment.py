"""nnU-Net environment: where nnxai's trainers live and the variables nnU-Net reads."""
from __future__ import annotations

import os
from pathlib import Path

import trainers

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def trainers_path() -> Path:
    """Folder holding nnxai's trainer classes, for nnU-Net's `nnUNet_extTrainer` search."""
    return Path(trainers.__file__).resolve().parent


def register_trainers(environ: os._Environ | dict = os.environ) -> None:
    """Make nnxai's trainers visible to nnU-Net in this process (and its children)."""
    folder = str(trainers_path())
    current = [p for p in environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])


def use_workspace(root: Path, environ: os._Environ | dict = os.environ) -> dict[str, Path]:
    """Point the three nnU-Net folders below `root` (unless already set) and register the trainers."""
    folders = {}
    for name in NNUNET_FOLDERS:
        environ.setdefault(name, str(Path(root, name).resolve()))
        folders[name] = Path(environ[name])
        folders[name].mkdir(parents=True, exist_ok=True)
    register_trainers(environ)
    return folders
