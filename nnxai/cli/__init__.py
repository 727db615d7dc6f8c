"""The `nnxai` command line: thin click wrappers that parse options and call library functions."""
from __future__ import annotations

import importlib
import sys

import click

from nnxai import __version__
from nnxai.errors import InputError


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use, so heavy modules load only when needed."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module_name, attribute = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        """Bad input raised by the library (InputError) ends the command with its one-line message."""
        try:
            return super().invoke(ctx)
        except InputError as error:
            raise click.ClickException(str(error)) from None


COMMANDS = {
    "convert": "nnxai.cli.convert:convert",
    "explain": "nnxai.cli.explain:explain",
    "demo": "nnxai.cli.demo:demo",
    "trainers-path": "nnxai.cli.trainers:trainers_path",
    "evaluate": "nnxai.cli.evaluate:evaluate",
    "compare": "nnxai.cli.evaluate:compare",
    "layers": "nnxai.cli.layers:layers",
    "fpfilter": "nnxai.cli.fpfilter:fpfilter",
    "experiment": "nnxai.cli.experiment:experiment",
    "merge": "nnxai.cli.merge:merge",
    "stats": "nnxai.cli.analysis:stats",
    "report": "nnxai.cli.analysis:report",
    "sanity": "nnxai.cli.sanity:sanity",
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nnxai")
def main() -> None:
    """Explain nnU-Net v2 lesion segmentations lesion by lesion."""


def explain_main() -> None:
    """Entry point of `nnUNetv2_explain` (the same command as `nnxai explain`)."""
    main(["explain", *sys.argv[1:]])
