"""`nnxai demo`: the main job on built-in phantom data."""
from __future__ import annotations

from pathlib import Path

import click

from nnxai.demo import Demo, DemoSettings


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_output"),
              show_default=True, help="Folder for everything the demo makes (nnU-Net folders included).")
@click.option("--fast", is_flag=True, help="A smaller, quicker run (what the end-to-end test runs).")
def demo(out: Path, fast: bool) -> None:
    """Phantom cohort -> nnU-Net training -> prediction -> lesion-level explanations; resumable."""
    Demo(out, DemoSettings.fast() if fast else DemoSettings()).run()
