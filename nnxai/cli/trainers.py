"""`nnxai trainers-path`: the one export nnU-Net's own commands need to find nnxai's trainers."""
from __future__ import annotations

import click

from nnxai.nnunet.environment import trainers_path as _trainers_path


@click.command("trainers-path")
@click.option("--export", is_flag=True, help="Print a shell `export nnUNet_extTrainer=...` line.")
def trainers_path(export: bool) -> None:
    """Print the folder of nnxai's trainers (for nnUNet_extTrainer)."""
    path = _trainers_path()
    click.echo(f"export nnUNet_extTrainer={path}" if export else str(path))
