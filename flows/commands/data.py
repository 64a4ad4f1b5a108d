"""``skf ingest`` and ``skf demo-data``: the data plane from the command line (no Prefect server needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from components.data.layouts import LAYOUTS
from components.errors import UserInputError
from flows.commands._progress import progress_bar

if TYPE_CHECKING:
    from components.data.ingest import IngestResult


def _summary_tables(result: IngestResult) -> list[Table]:
    counts = Table(title=f"{result.ref} ({'created' if result.created else 'unchanged: identical content'})")
    for column in ("split", "role", "images"):
        counts.add_column(column, justify="right" if column == "images" else "left")
    for split, roles in result.counts.items():
        for role, n in roles.items():
            counts.add_row(split, role, str(n))
    tables = [counts]
    if result.quarantined:
        quarantine = Table(title=f"Quarantined ({len(result.quarantined)})")
        for column in ("file", "reason", "detail"):
            quarantine.add_column(column, overflow="fold")
        for q in result.quarantined[:50]:
            quarantine.add_row(q.rel_path, q.reason, q.detail)
        if len(result.quarantined) > 50:
            quarantine.add_row("...", f"{len(result.quarantined) - 50} more", "see the report")
        tables.append(quarantine)
    return tables


def ingest_command(
    source: str = typer.Argument(..., help="Folder, .zip/.tar.gz archive, or s3://bucket/prefix."),
    name: str = typer.Option(..., "--name", "-n", help="Dataset name, e.g. lol or lol-v2-real."),
    layout: str = typer.Option(
        "auto",
        help=f"Layout: auto, {', '.join(LAYOUTS)}. Files pair by name; append +pair-by-order "
        "(e.g. lol-v2-real+pair-by-order) to pair them by sorted order instead (recorded in the version).",
    ),
    max_pixels: int | None = typer.Option(
        None, help="Largest image (width x height) accepted [default: SKF_MAX_IMAGE_PIXELS]."
    ),
) -> None:
    """Ingest SOURCE as a new version of dataset NAME (a no-op when the content is unchanged).

    Failures (missing source, unknown layout, unsafe or oversized archive, nothing valid) are
    SKFErrors: they propagate to the CLI boundary, which prints one ``error:`` line.
    """
    from components.data.ingest import ingest

    console = Console()
    with progress_bar(console) as bar:
        task_id = bar.add_task("ingesting", total=None, info="")

        def progress(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        result = ingest(source, name=name, layout=layout, progress=progress, max_pixels=max_pixels)
    for table in _summary_tables(result):
        console.print(table)
    if result.changes:
        console.print(", ".join(f"{k}: {len(v)}" for k, v in result.changes.items()) + " pair keys")
    if result.conversions:
        console.print(f"{len(result.conversions)} image(s) are not plain RGB (see the report)")
    if result.report_uri:
        console.print(f"quarantine report: {result.report_uri}")
    console.print(f"[green]{result.ref}[/green] manifest {result.manifest_sha256}")


def demo_data_command(
    out: Path = typer.Argument(..., help="Folder to write the LOL-layout demo dataset into."),
    seed: int = typer.Option(0, help="Random seed (the output is bit-exact for a given seed)."),
    pairs: int = typer.Option(6, "--pairs", help="Crops (pairs) per source photo."),
    height: int = typer.Option(128, help="Crop height (multiple of 32)."),
    width: int = typer.Option(192, help="Crop width (multiple of 32)."),
    overwrite: bool = typer.Option(False, help="Replace an existing demo dataset in OUT."),
) -> None:
    """Generate synthetic low-light pairs (LOL layout) from photos bundled with scikit-image."""
    from components.data.demo import generate_demo_dataset

    try:
        root = generate_demo_dataset(
            out, seed=seed, size=(height, width), pairs_per_photo=pairs, overwrite=overwrite
        )
    except (ValueError, FileExistsError) as exc:  # bad options or an existing dataset: the CLI's one line
        raise UserInputError(str(exc)) from exc
    n_train = len(list((root / "our485" / "low").iterdir()))
    n_test = len(list((root / "eval15" / "low").iterdir()))
    Console().print(f"wrote {n_train} train and {n_test} test pairs to {root}")


def scene_data_command(
    out: Path = typer.Argument(..., help="Folder to write the labelled scenes into (LOL layout + labels/)."),
    train: int = typer.Option(32, help="Train scenes."),
    test: int = typer.Option(8, help="Test scenes."),
    seed: int = typer.Option(0, help="Random seed (the output is bit-exact for a given seed)."),
    height: int = typer.Option(128, help="Scene height (multiple of 32)."),
    width: int = typer.Option(192, help="Scene width (multiple of 32)."),
    overwrite: bool = typer.Option(False, help="Replace an existing scene dataset in OUT."),
) -> None:
    """Generate labelled scenes whose low-light degradation depends on the class (the semantic benchmark)."""
    from components.data.scenes import generate_scene_dataset

    try:
        root = generate_scene_dataset(
            out, seed=seed, size=(height, width), train=train, test=test, overwrite=overwrite
        )
    except (ValueError, FileExistsError) as exc:  # bad options or an existing dataset: the CLI's one line
        raise UserInputError(str(exc)) from exc
    Console().print(
        f"wrote {train} train and {test} test labelled scenes to {root}; "
        f"ingest with `skf ingest {root} --name scenes`"
    )


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_command)
    app.command("demo-data")(demo_data_command)
    app.command("scene-data")(scene_data_command)
