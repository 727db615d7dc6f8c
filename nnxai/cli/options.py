"""Options that several commands share, defined once."""
from __future__ import annotations

import click

trust_model_option = click.option(
    "--trust-model", "--trust-checkpoint", "trust_checkpoint", is_flag=True,
    help="Trust this model folder: unpickle any checkpoint content and build whatever classes its plans.json "
         "names (both can run code: only for models from a source you trust).")
