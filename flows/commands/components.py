"""``skf components``: list the registered components."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from components import registry


def register(app: typer.Typer) -> None:
    @app.command("components")
    def list_components(
        kind: str | None = typer.Option(None, help="Only this kind (skb, se, loss, baseline, ...)."),
    ) -> None:
        """Print the component registry as a table (kind, name, version, description)."""
        table = Table(title="SKF components")
        for column in ("spec", "kind", "name", "version", "description"):
            table.add_column(column)
        for entry in registry.entries(kind):
            s = entry.spec
            table.add_row(entry.key, s.kind, s.name, str(s.version), entry.description)
        Console().print(table)
