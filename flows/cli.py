"""The ``skf`` command line. Each command group lives in ``flows.commands.<area>`` and registers itself."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="skf",
    help="Semantic-aware low-light enhancement (SKF) pipeline: data, priors, training, evaluation, registry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

COMMAND_MODULES: tuple[str, ...] = (
    "flows.commands.components",
    "flows.commands.data",
    "flows.commands.priors",
    "flows.commands.weights",
    "flows.commands.serving",
    "flows.commands.pipeline",
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()
