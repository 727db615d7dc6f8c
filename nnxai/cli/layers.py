"""`nnxai layers`: the layer names a model's Grad-CAM++ can hook (`nnxai explain --method gradcampp --layer`)."""
from __future__ import annotations

from pathlib import Path

import click

from nnxai.attribution.gradcampp import LayerError, default_layer, valid_layers
from nnxai.cli.options import trust_model_option
from nnxai.nnunet.model import load_model, model_folder


@click.command("layers", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "model_dir", type=click.Path(path_type=Path), help="Model folder (instead of -d/-c/-tr/-p).")
@click.option("-d", "dataset", help="Dataset name or id, as for nnUNetv2_predict.")
@click.option("-c", "configuration", default="3d_fullres", show_default=True, help="nnU-Net configuration.")
@click.option("-tr", "trainer", default="nnUNetTrainer", show_default=True, help="Trainer class name.")
@click.option("-p", "plans", default="nnUNetPlans", show_default=True, help="Plans identifier.")
@click.option("-chk", "checkpoint", default="checkpoint_final.pth", show_default=True, help="Checkpoint file name.")
@trust_model_option
def layers(model_dir, dataset, configuration, trainer, plans, checkpoint, trust_checkpoint) -> None:
    """List the layers whose output Grad-CAM++ can use: name, channels, stride (input voxels per layer voxel)."""
    if model_dir is None and dataset is None:
        raise click.UsageError("give a model: -m MODEL_FOLDER, or -d DATASET [-c -tr -p]")
    folder = model_dir or model_folder(dataset, configuration, trainer, plans)
    model = load_model(folder, None, checkpoint, trust_checkpoint)
    network = model.networks[0]
    try:
        default = default_layer(network)
    except LayerError:
        default = None
    infos = valid_layers(network, model.configuration_manager.patch_size, len(model.channel_names))
    width = max(len(info.name) for info in infos)
    click.echo(f"{'layer':<{width}}  channels  stride")
    for info in infos:
        stride = "x".join(str(s) for s in info.stride)
        mark = "(default)" if info.name == default else ""
        click.echo(f"{info.name:<{width}}  {info.channels:>8}  {stride:<6}  {mark}".rstrip())
