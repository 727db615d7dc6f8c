"""`nnxai convert NAME ...`: dataset converters, one module each in `dataset_conversion/`."""
from __future__ import annotations

from dataset_conversion import CONVERTERS
from nnxai.cli import LazyGroup
import click


@click.group(cls=LazyGroup, lazy_commands=CONVERTERS)
def convert() -> None:
    """Write a dataset in nnU-Net's raw format (FLAIR = channel 0, T1/MPRAGE = channel 1)."""
