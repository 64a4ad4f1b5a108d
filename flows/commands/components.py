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
        table.add_column("spec", no_wrap=True, style="bold")
        table.add_column("kind", no_wrap=True)
        table.add_column("latest", no_wrap=True)
        table.add_column("description")
        specs = registry.entries(kind)
        latest = {(e.spec.kind, e.spec.name): e.spec.version for e in specs}
        for entry in specs:
            s = entry.spec
            is_latest = "yes" if latest[(s.kind, s.name)] == s.version else ""
            table.add_row(entry.key, s.kind, is_latest, entry.description)
        Console(width=max(Console().width, 120)).print(table)
