"""`nnxai explain` (also installed as `nnUNetv2_explain`): nnUNetv2_predict's flags plus the explanation's."""
from __future__ import annotations

import os
from pathlib import Path

import click
import torch

from nnxai.explain import METHODS, CaseError, ExplainSettings, explain_cohort, prepare_output_folder
from nnxai.instances import CONNECTIVITIES, MATCHING_RULES
from nnxai.model import load_model, model_folder


def resolve_device(name: str) -> str:
    """The torch device asked for, refusing one this machine does not have."""
    if name == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("-device cuda: no CUDA GPU is available here (use -device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise click.ClickException("-device mps: Apple MPS is not available here (use -device cpu)")
    return name


@click.command("explain", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-i", "images", required=True, type=click.Path(path_type=Path),
              help="Input folder in nnU-Net format (CASE_0000.nii.gz = FLAIR, CASE_0001.nii.gz = T1, ...).")
@click.option("-o", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("-m", "model_dir", type=click.Path(path_type=Path), help="Model folder (instead of -d/-c/-tr/-p).")
@click.option("-d", "dataset", help="Dataset name or id, as for nnUNetv2_predict.")
@click.option("-c", "configuration", default="3d_fullres", show_default=True, help="nnU-Net configuration.")
@click.option("-tr", "trainer", default="nnUNetTrainer", show_default=True, help="Trainer class name.")
@click.option("-p", "plans", default="nnUNetPlans", show_default=True, help="Plans identifier.")
@click.option("-f", "folds", multiple=True, help="Folds to ensemble (mean of logits); default: all present.")
@click.option("-chk", "checkpoint", default="checkpoint_final.pth", show_default=True, help="Checkpoint file name.")
@click.option("-device", "device", type=click.Choice(["cpu", "cuda", "mps"]), default="cuda" if torch.cuda.is_available() else "cpu",
              show_default="cuda if available, else cpu", help="Device for prediction and gradients.")
@click.option("-step_size", "step_size", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Sliding-window step as a fraction of the patch size.")
@click.option("--disable_tta", is_flag=True, help="No mirroring test-time augmentation (faster, as in nnUNetv2_predict).")
@click.option("-num_parts", type=click.IntRange(min=1), default=1, show_default=True, help="Split the cases into parts.")
@click.option("-part_id", type=click.IntRange(min=0), default=0, show_default=True, help="Which part this run does.")
@click.option("--gt", "gt_dir", type=click.Path(path_type=Path),
              help="Ground-truth labels folder (CASE.nii.gz): groups instances into TP / FP / FN.")
@click.option("--method", type=click.Choice(METHODS), default="smoothgrad", show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=50, show_default=True, help="SmoothGrad noise samples.")
@click.option("--noise", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Noise sigma as a fraction of the FLAIR range of the network input.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Lesion probability above which a voxel is predicted lesion.")
@click.option("--min-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Drop predicted components with fewer voxels (the study: 6).")
@click.option("--connectivity", type=click.Choice([str(c) for c in CONNECTIVITIES]), default="18", show_default=True)
@click.option("--rule", type=click.Choice(MATCHING_RULES), default="any", show_default=True,
              help="Matching rule: any overlap, or IoU >= --iou-threshold.")
@click.option("--iou-threshold", type=click.FloatRange(0, 1), default=0.25, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (per case: seed and case name).")
@click.option("--overwrite", is_flag=True, help="Redo finished cases (default: skip them, so runs resume).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow checkpoints holding arbitrary Python objects (runs their code: trusted sources only).")
def explain(images, out, model_dir, dataset, configuration, trainer, plans, folds, checkpoint, device, step_size,
            disable_tta, num_parts, part_id, gt_dir, method, samples, noise, threshold, min_size, connectivity, rule,
            iou_threshold, seed, overwrite, trust_checkpoint) -> None:
    """Explain each lesion instance nnU-Net predicts (or misses, with --gt) in every case of -i."""
    if model_dir is None and dataset is None:
        raise click.UsageError("give a model: -m MODEL_FOLDER, or -d DATASET [-c -tr -p]")
    if part_id >= num_parts:
        raise click.UsageError(f"-part_id {part_id} must be smaller than -num_parts {num_parts}")
    device = resolve_device(device)
    if model_dir is None and not os.environ.get("nnUNet_results"):
        raise click.UsageError("-d needs the environment variable nnUNet_results (nnU-Net's trained models folder); "
                               "set it, or give the model folder with -m")
    try:
        prepare_output_folder(out)
    except CaseError as error:
        raise click.ClickException(str(error)) from None
    folder = model_dir or model_folder(dataset, configuration, trainer, plans)
    model = load_model(folder, list(folds) or None, checkpoint, trust_checkpoint)
    settings = ExplainSettings(method=method, samples=samples, noise=noise, threshold=threshold, min_size=min_size,
                               connectivity=int(connectivity), rule=rule, iou_threshold=iou_threshold, seed=seed,
                               step_size=step_size, use_mirroring=not disable_tta)
    try:
        result = explain_cohort(model, images, out, settings, gt_dir, num_parts, part_id, overwrite, device)
    except CaseError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"explained {len(result.explained)} case(s), skipped {len(result.skipped)} finished, "
               f"failed {len(result.failed)}; tables in {out}")
    if result.failed:
        raise SystemExit(1)
