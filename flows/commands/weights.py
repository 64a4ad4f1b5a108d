"""``skf weights status|sync``: what weight files the pipeline can use, and seeding the caches offline.

Only files whose full sha256 matches a pin (in the code, or the operator's ``--sha256``/``SKF_PIN_SHA256``)
are copied; the rest are refused with a one-line error and a non-zero exit.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from components import weights

_SOURCE_HELP = "Weights folder or s3:// URI (default SKF_WEIGHTS_URI)."
_PIN_HELP = (
    "Pin a file without a published digest, NAME=<full sha256> (repeatable; also SKF_PIN_SHA256). "
    "Take the digest from a source you trust, never from the weights store."
)


def _table(title: str, rows: list[weights.WeightStatus]) -> Table:
    """The status table; cells are plain Text so paths and error messages are never read as markup."""
    table = Table(title=title)
    for column in ("name", "purpose", "present", "where looked", "sha256", "note"):
        table.add_column(column, overflow="fold")
    for s in rows:
        cells = (
            s.name,
            s.purpose,
            "yes" if s.present else "no",
            "\n".join(f"{p} (found)" if p == s.path else p for p in s.looked_in),
            s.sha256 or "-",
            s.note,
        )
        table.add_row(*(Text(c) for c in cells))
    return table


def _print(title: str, rows: list[weights.WeightStatus]) -> None:
    Console(width=200).print(_table(title, rows))


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Offline weight files (metrics, SKB): status and cache seeding.", no_args_is_help=True
    )

    @group.command("status")
    def status(
        source: str | None = typer.Option(None, help=_SOURCE_HELP),
        sha256: list[str] = typer.Option([], "--sha256", help=_PIN_HELP),
    ) -> None:
        """Show every known weight file: present or not, where it was looked for, its sha256 and check."""
        pins = weights.parse_pins(sha256, "--sha256")
        problem = weights.store_problem(source)
        if problem:  # said once in full, not folded into every row of the table
            typer.echo(f"warning: {problem}")
        _print("SKF weights", weights.weights_status(source, pins=pins))

    @group.command("sync")
    def sync(
        source: str | None = typer.Option(None, help=_SOURCE_HELP),
        sha256: list[str] = typer.Option([], "--sha256", help=_PIN_HELP),
    ) -> None:
        """Copy the files in the weights store into the torch/pyiqa caches, each checked against its pin."""
        pins = weights.parse_pins(sha256, "--sha256")
        try:
            rows = weights.sync_weights(source, pins=pins)
        except weights.WeightIntegrityError as exc:
            if exc.rows:
                _print("SKF weights after sync (with refusals)", exc.rows)
            raise
        _print("SKF weights after sync", rows)

    app.add_typer(group, name="weights")
