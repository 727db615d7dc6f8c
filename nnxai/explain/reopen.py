"""A finished explain run opened again with its model, for the experiments and the sanity checks.

Both start from OUT/run.json: the same model (refused if its checkpoints changed since), the same images and
ground truth, the same settings unless the caller overrides some; `ReopenedRun` holds them together with the
output folder, so the folder format is read in one place (`ExplainOutput`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nnxai.explain.cases import CaseError, find_cases
from nnxai.explain.output import RUN_RECORD, AnalysisInputError, ExplainOutput, load_explain_output
from nnxai.explain.settings import ExplainSettings
from nnxai.nnunet.geometry import preprocess, to_network_space
from nnxai.nnunet.model import LoadedModel, load_model
from nnxai.nnunet.sliding_window import SlidingWindow


@dataclass
class CaseInput:
    """One case in network space: the preprocessed input and the instance labels on the same grid."""

    case: str
    data: torch.Tensor
    properties: dict
    instance_labels: np.ndarray

    def mask(self, instance_id: int) -> np.ndarray:
        return self.instance_labels == instance_id


@dataclass(frozen=True)
class ReopenedRun:
    """An explain output folder with its model loaded again and the settings to predict with."""

    output: ExplainOutput
    model: LoadedModel
    settings: ExplainSettings
    images_dir: Path
    gt_dir: Path | None

    @property
    def out_dir(self) -> Path:
        return self.output.folder

    @property
    def instances(self) -> pd.DataFrame:
        return self.output.instances

    @property
    def channel_names(self) -> list[str]:
        return self.model.channel_names

    def network_spacing(self) -> list[float]:
        return [float(s) for s in self.model.configuration_manager.spacing]

    def window(self, device: str = "cpu", networks: Sequence[torch.nn.Module] | None = None) -> SlidingWindow:
        """The run's sliding window (step, mirroring) over the model's networks or over replacements of them."""
        window = self.model.sliding_window(self.settings.step_size, self.settings.use_mirroring, device)
        if networks is None:
            return window
        return SlidingWindow([n.to(device) for n in networks], window.patch_size, window.step_size,
                             window.mirror_axes, device=device)

    @cached_property
    def _cases(self) -> dict[str, list[Path]]:
        """Every case of the input folder with its channel files (the folder is read once)."""
        try:
            return find_cases(self.images_dir, self.model.dataset_json["file_ending"], len(self.channel_names))
        except CaseError as error:
            raise AnalysisInputError(str(error)) from None

    def case_files(self, only: Sequence[str] | None = None) -> dict[str, list[Path]]:
        """The cases of the input folder (all, or the ones named in `only`), with their channel files."""
        cases = self._cases
        unknown = [case for case in only or () if case not in cases]
        if unknown:
            raise AnalysisInputError(f"{self.images_dir}: no case named {', '.join(unknown)}")
        if only:
            cases = {case: cases[case] for case in only}
        if not cases:
            raise AnalysisInputError(f"{self.images_dir}: no input images "
                                     f"(CASE_0000{self.model.dataset_json['file_ending']})")
        return cases

    def gt_file(self, case: str) -> Path | None:
        """The case's ground-truth labels, or None without a ground-truth folder."""
        return None if self.gt_dir is None else self.gt_dir / f"{case}{self.model.dataset_json['file_ending']}"

    def case_input(self, case: str) -> CaseInput:
        """Preprocess the case's images as explain did and bring its instance labels onto the network grid."""
        files = self._cases.get(case)
        if files is None or not all(f.is_file() for f in files):
            raise AnalysisInputError(f"{self.images_dir}: images of case {case} are missing (use --images)")
        data, properties = preprocess(self.model, files)
        labels_file = self.output.instance_labels_path(case)
        if not labels_file.is_file():
            raise AnalysisInputError(f"{labels_file}: missing; explain this case again")
        labels, _ = self.model.plans_manager.image_reader_writer_class().read_seg([str(labels_file)])
        network_labels = to_network_space(self.model, labels[0].astype(np.int32), properties)
        return CaseInput(case, torch.from_numpy(data), properties, network_labels)


def reopen_run(out_dir: Path, images_dir: Path | None = None, gt_dir: Path | None = None,
               model_dir: Path | None = None, folds: Sequence[str] = (), checkpoint: str | None = None,
               trust_checkpoint: bool = False, **setting_overrides) -> ReopenedRun:
    """Reopen an explain output folder: its model (checked against the recorded hashes), inputs and settings.

    The arguments override what run.json records; setting overrides that are None keep the recorded value.
    Naming another model (`model_dir`, `folds`, `checkpoint`) skips the hash check.
    """
    output = load_explain_output(Path(out_dir))
    recorded = output.model_record
    model = load_model(model_dir or recorded["folder"], list(folds) or recorded["folds"],
                       checkpoint or recorded["checkpoint"], trust_checkpoint)
    own = model_dir is None and not folds and checkpoint is None
    if own and recorded["checkpoint_sha256"] and model.checkpoint_sha256 != recorded["checkpoint_sha256"]:
        raise AnalysisInputError(f"{output.folder / RUN_RECORD}: the checkpoints in {recorded['folder']} changed "
                                 "since the explain run (sha256 differs); explain again, or name the model to use "
                                 "with -m")
    images_dir = Path(images_dir or output.images_dir)
    if not images_dir.is_dir():
        raise AnalysisInputError(f"{images_dir}: input folder of the explain run not found (use --images)")
    settings = replace(output.settings, **{k: v for k, v in setting_overrides.items() if v is not None})
    return ReopenedRun(output, model, settings, images_dir, Path(gt_dir) if gt_dir else output.gt_dir)
