"""`nnxai explain` (also installed as `nnUNetv2_explain`): nnUNetv2_predict's flags plus the explanation's."""
from __future__ import annotations

import os
from pathlib import Path

import click

from nnxai.attribution.engine import AMP_DTYPES, BACKWARD_MODES
from nnxai.attribution.gradcampp import VARIANTS
from nnxai.attribution.smoothgrad import AGGREGATIONS
from nnxai.cli.options import device_option, instance_options, trust_model_option
from nnxai.errors import InputError
from nnxai.explain.cohort import explain_cohort, prepare_output_folder
from nnxai.explain.settings import DEFAULT_MAX_MAPS, METHODS, ComputeOptions, ExplainSettings
from nnxai.nnunet.model import load_model, model_folder


def parse_methods(_ctx, _param, values: tuple[str, ...]) -> tuple[str, ...]:
    """`--method a --method b` or `--method a,b`: the methods in the order given, each once."""
    methods = tuple(dict.fromkeys(m.strip() for value in values for m in value.split(",") if m.strip()))
    for method in methods:
        if method not in METHODS:
            raise click.BadParameter(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return methods or ("smoothgrad",)


def parse_samples(_ctx, _param, value: str) -> int | str:
    """A positive number of noise samples, or "auto"."""
    if value == "auto":
        return value
    try:
        samples = int(value)
    except ValueError:
        samples = 0
    if samples < 1:
        raise click.BadParameter(f"{value!r} is neither a positive number nor 'auto'")
    return samples


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
@device_option
@click.option("-step_size", "step_size", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Sliding-window step as a fraction of the patch size.")
@click.option("--disable_tta", is_flag=True, help="No mirroring test-time augmentation (faster, as in nnUNetv2_predict).")
@click.option("-num_parts", type=click.IntRange(min=1), default=1, show_default=True, help="Split the cases into parts.")
@click.option("-part_id", type=click.IntRange(min=0), default=0, show_default=True, help="Which part this run does.")
@click.option("--gt", "gt_dir", type=click.Path(path_type=Path),
              help="Ground-truth labels folder (CASE.nii.gz): groups instances into TP / FP / FN.")
@click.option("--method", "methods", multiple=True, callback=parse_methods,
              help=f"Saliency method(s): {', '.join(METHODS)}; repeat the option or separate with commas "
                   "[default: smoothgrad].")
@click.option("--samples", default="50", show_default=True, callback=parse_samples,
              help="SmoothGrad noise samples, or 'auto': per instance until its map converged (--tol, --max-samples).")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="--samples auto: stop when the map's relative standard error (L2 and at its peak) is below this.")
@click.option("--max-samples", type=click.IntRange(min=5), default=200, show_default=True,
              help="--samples auto: at most this many samples.")
@click.option("--antithetic/--independent-noise", default=None,
              help="Draw noise in +/- pairs (same SmoothGrad map, less sampling error per sample) or independently "
                   "as the study did [default: pairs with --samples auto, else independent].")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="mean", show_default=True,
              help="SmoothGrad over the instance: gradient of its summed logits (mean), or per voxel, keeping the "
                   "largest magnitude at each position (max; one backward pass per instance voxel).")
@click.option("--layer", help="Grad-CAM++ layer (list: nnxai layers -m MODEL) [default: the last decoder stage].")
@click.option("--gradcampp-variant", type=click.Choice(VARIANTS), default="monai", show_default=True,
              help="alpha's denominator: sum(A g^3) as MONAI (monai), or sum(A) g^3 as the paper's Eq. 19 (paper).")
@click.option("--normalize", is_flag=True, help="Min-max scale each Grad-CAM++ map to [0, 1] (default: raw values).")
@click.option("--amp", type=click.Choice(tuple(AMP_DTYPES)), is_flag=False, flag_value="fp16", default=None,
              help="Mixed precision on CUDA (--amp = fp16, with scaled gradients; or bf16); maps move by several "
                   "percent, see docs/methods.md.")
@click.option("--backward", type=click.Choice(BACKWARD_MODES), default="auto", show_default=True,
              help="Backward passes one by one (loop), vmapped in batches (batched), or the faster of the two as "
                   "measured on the first batch (auto).")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most gradient targets (instances, or voxels with --aggregation max) per batch.")
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True),
              help="MB for one tile's graph plus one batch of gradients; lowers --max-batch to fit.")
@click.option("--max-maps", type=click.IntRange(min=1), default=DEFAULT_MAX_MAPS, show_default=True,
              help="Most SmoothGrad maps held in memory: instances are explained in groups of this size, each "
                   "written before the next starts (same maps; one more forward pass per tile and group).")
@click.option("--noise", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Noise sigma as a fraction of the FLAIR range of the network input.")
@click.option("--label", "label", metavar="NAME|ID",
              help="Foreground label to explain, by dataset.json name or id [default: the only foreground label].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Lesion probability above which a voxel is predicted lesion (two-class models; with more "
                   "classes the segmentation is nnU-Net's argmax).")
@instance_options({"min_size": 1, "connectivity": "18", "rule": "any", "iou_threshold": 0.25})
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (per case: seed and case name).")
@click.option("--overwrite", is_flag=True, help="Redo finished cases (default: skip them, so runs resume).")
@trust_model_option
def explain(images, out, model_dir, dataset, configuration, trainer, plans, folds, checkpoint, device, step_size,
            disable_tta, num_parts, part_id, gt_dir, methods, samples, tol, max_samples, antithetic, aggregation,
            layer, gradcampp_variant, normalize, amp, backward, max_batch, memory_budget, max_maps, noise, threshold,
            label, min_size, connectivity, rule, iou_threshold, seed, overwrite, trust_checkpoint) -> None:
    """Explain each lesion instance nnU-Net predicts (or misses, with --gt) in every case of -i."""
    if model_dir is None and dataset is None:
        raise click.UsageError("give a model: -m MODEL_FOLDER, or -d DATASET [-c -tr -p]")
    if part_id >= num_parts:
        raise click.UsageError(f"-part_id {part_id} must be smaller than -num_parts {num_parts}")
    if amp and device != "cuda":
        raise click.UsageError(f"--amp needs -device cuda: mixed precision is offered for GPUs only "
                               f"(on {device}, leave --amp out and run in float32; see docs/methods.md)")
    if model_dir is None and not os.environ.get("nnUNet_results"):
        raise click.UsageError("-d needs the environment variable nnUNet_results (nnU-Net's trained models folder); "
                               "set it, or give the model folder with -m")
    if model_dir is None and not Path(os.environ["nnUNet_results"]).is_dir():
        raise click.UsageError(f"-d looks for trained models in nnUNet_results={os.environ['nnUNet_results']}, "
                               "which is not a folder; point it at the folder nnUNetv2_train wrote, or give the "
                               "model folder with -m")
    created = not out.exists()
    prepare_output_folder(out)
    try:
        folder = model_dir or model_folder(dataset, configuration, trainer, plans)
        model = load_model(folder, list(folds) or None, checkpoint, trust_checkpoint)
        lesion_label = model.resolve_label(label)
        model.check_threshold(threshold)
    except InputError:
        if created:  # a refused model leaves no output folder behind
            out.rmdir()
        raise
    settings = ExplainSettings(methods=methods, samples=samples, noise=noise, aggregation=aggregation, tol=tol,
                               max_samples=max_samples, antithetic=antithetic, layer=layer,
                               gradcampp_variant=gradcampp_variant,
                               normalize=normalize, amp=amp, threshold=threshold, lesion_label=lesion_label,
                               min_size=min_size,
                               connectivity=connectivity, rule=rule, iou_threshold=iou_threshold, seed=seed,
                               step_size=step_size, use_mirroring=not disable_tta)
    compute = ComputeOptions(backward, max_batch, memory_budget, max_maps)
    result = explain_cohort(model, images, out, settings, gt_dir, num_parts, part_id, overwrite, device,
                            compute=compute)
    click.echo(f"explained {len(result.done)} case(s), skipped {len(result.skipped)} finished, "
               f"failed {len(result.failed)}; tables in {out}")
    if result.failed:
        raise SystemExit(1)
