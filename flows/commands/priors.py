"""``skf precompute``: fill the SKB prior cache for a dataset version, with a progress bar."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from components.precompute import DEFAULT_SKB, DEFAULT_SPLITS
from flows.commands._progress import progress_bar


def precompute_command(
    version_ref: str = typer.Argument(..., help="Dataset version, e.g. lol@2 (or lol for the latest)."),
    skb: str = typer.Option(
        DEFAULT_SKB, "--skb", help="SKB component spec (see `skf components --kind skb`)."
    ),
    checkpoint: str | None = typer.Option(
        None, help="HRNet checkpoint path or URI; without one the SKB is randomly initialised."
    ),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per SKB forward pass."),
    split: list[str] = typer.Option(list(DEFAULT_SPLITS), "--split", help="Splits to cover (repeatable)."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
) -> None:
    """Compute and cache the SKB priors of VERSION_REF's low-light images that are not cached yet."""
    from components.errors import SKFError, UserInputError
    from components.precompute import precompute_priors
    from components.registry import UnknownComponentError

    console = Console()
    try:
        with progress_bar(console) as bar:
            task_id = bar.add_task("priors", total=None, info="")

            def progress(done: int, total: int) -> None:
                bar.update(task_id, completed=done, total=total)

            summary = precompute_priors(
                version_ref,
                skb,
                checkpoint=checkpoint,
                batch_size=batch_size,
                splits=tuple(split),
                progress=progress,
                device=device,
            )
    except SKFError:
        raise
    except (UnknownComponentError, LookupError, ValueError) as exc:  # bad ref or spec: the CLI's one line
        raise UserInputError(str(exc)) from exc

    _print_summary(console, summary)


def _print_summary(console: Console, summary: Any) -> None:
    """The summary table, a warning for a random-init SKB, and the failures (exit code 1)."""
    table = Table(title=f"Priors for {summary.version_ref}")
    table.add_column("")
    table.add_column("", justify="right")
    for key, value in summary.rows():
        table.add_row(key, value)
    console.print(table)
    if not summary.pretrained:
        console.print(
            "[yellow]warning:[/yellow] the SKB is randomly initialised; its priors carry no semantics"
        )
    if summary.errors:
        failures = Table(title=f"Failures ({summary.failed})")
        failures.add_column("image sha256")
        failures.add_column("error", overflow="fold")
        for sha, msg in sorted(summary.errors.items())[:50]:
            failures.add_row(sha[:16], msg)
        console.print(failures)
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("precompute")(precompute_command)
