"""The ``skf`` command line. Each command group lives in ``flows.commands.<area>`` and registers itself.

:func:`main` is the console entry point and the one error boundary: a failure the user can act on
(:class:`~components.errors.SKFError` and the few library errors listed in :func:`describe_error`) prints
one ``error: …`` line and exits non-zero; ``skf --debug …`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import typer

from components.errors import SKFError

app = typer.Typer(
    name="skf",
    help="Semantic-aware low-light enhancement (SKF) pipeline: data, priors, training, evaluation, registry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES: tuple[str, ...] = (
    "flows.commands.components",
    "flows.commands.data",
    "flows.commands.priors",
    "flows.commands.weights",
    "flows.commands.serving",
    "flows.commands.pipeline",
    "flows.commands.segmenter",
)


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="On an error, show the full traceback (accepted after any command too)."
    ),
) -> None:
    """Semantic-aware low-light enhancement (SKF) pipeline: data, priors, training, evaluation, registry."""


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def describe_error(exc: BaseException) -> tuple[str, int] | None:
    """``(one-line message, exit code)`` for a failure the user can act on; None for a bug."""
    if isinstance(exc, SKFError):
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return _one_line(str(text)), exc.exit_code
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
        return _one_line(f"{exc.strerror or type(exc).__name__}: {exc.filename or exc}"), 2
    if isinstance(exc, OSError) and exc.errno is not None:
        return _one_line(f"{exc}"), 1
    if isinstance(exc, MemoryError):
        return "out of memory; lower the SKF_MAX_* limits or the batch size", 1
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "failed"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; map errors to one line and a non-zero exit unless ``--debug`` was given."""
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:cut]  # accepted anywhere before "--", not only right after `skf`
    args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
    try:
        code = app(args=args, prog_name="skf", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: the parser's own message and exit code (2)
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        described = describe_error(exc)
        if described is None:
            typer.echo(
                f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
                "(rerun with `skf --debug …` for the traceback and report it)",
                err=True,
            )
            sys.exit(1)
        message, exit_code = described
        typer.echo(f"error: {message}", err=True)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)
