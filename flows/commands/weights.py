"""``skf weights status|sync``: what weight files the pipeline can use, and seeding the caches offline."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from components import weights
from components.storage import IntegrityError, StorageError


def _table(title: str, rows: list[weights.WeightStatus]) -> Table:
    table = Table(title=title)
    for column in ("name", "purpose", "present", "where looked", "sha256", "note"):
        table.add_column(column, overflow="fold")
    for s in rows:
        table.add_row(
            s.name,
            s.purpose,
            "yes" if s.present else "no",
            "\n".join(f"{p} (found)" if p == s.path else p for p in s.looked_in),
            s.sha256 or "-",
            s.note,
        )
    return table


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Offline weight files (metrics, SKB): status and cache seeding.", no_args_is_help=True
    )

    @group.command("status")
    def status(
        source: str | None = typer.Option(
            None, help="Weights folder or s3:// URI (default SKF_WEIGHTS_URI)."
        ),
    ) -> None:
        """Show every known weight file: present or not, where it was looked for, its sha256."""
        Console(width=200).print(_table("SKF weights", weights.weights_status(source)))

    @group.command("sync")
    def sync(
        source: str | None = typer.Option(
            None, help="Weights folder or s3:// URI (default SKF_WEIGHTS_URI)."
        ),
    ) -> None:
        """Copy the files present in the weights store into the torch/pyiqa caches, sha256-verified."""
        try:
            rows = weights.sync_weights(source)
        except (IntegrityError, StorageError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        Console(width=200).print(_table("SKF weights after sync", rows))

    app.add_typer(group, name="weights")
