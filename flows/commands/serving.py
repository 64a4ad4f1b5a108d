"""``skf enhance``, ``skf export`` and ``skf promote``: use and manage registered enhancers."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from components.serving import IMAGE_SUFFIXES, UnreadableImageError, read_image, write_image

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MODEL_HELP = "MLflow model URI: models:/<name>@champion, models:/<name>/<version>, runs:/<run>/enhancer or a model dir."


def _inputs(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise typer.BadParameter(f"{source} does not exist", param_hint="IN")


def enhance_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    source: Path = typer.Argument(..., metavar="IN", help="An image file or a folder of images."),
    dest: Path = typer.Argument(..., metavar="OUT", help="Output file (for a file IN) or folder."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
) -> None:
    """Enhance images with a registered model, keeping file names and bit depth (16-bit stays 16-bit).

    Unreadable files are skipped with a message; the exit code is 0 when at least one image was written.
    """
    from components.serving import enhance_arrays, load_enhancer

    files = _inputs(source)
    if not files:
        typer.echo(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}", err=True)
        raise typer.Exit(1)
    single = source.is_file()
    if single and dest.is_dir():
        dest = dest / source.name
    enhancer = load_enhancer(model, device=device)
    done, skipped = 0, []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("enhancing", total=len(files))
        for path in files:
            target = dest if single else dest / path.name
            try:
                image = read_image(path)
            except (UnreadableImageError, OSError) as exc:
                skipped.append(path.name)
                progress.console.print(f"[yellow]skipped[/] {exc}")
            else:
                write_image(target, enhance_arrays(enhancer, [image])[0])
                done += 1
            progress.advance(task)
    typer.echo(f"enhanced {done} of {len(files)} image(s) into {dest}; skipped {len(skipped)}")
    if skipped:
        typer.echo("skipped: " + ", ".join(skipped))
    if done == 0:
        raise typer.Exit(1)


def export_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    fmt: str = typer.Option(..., "--format", "-f", help="torchscript or onnx."),
    out: Path = typer.Argument(..., metavar="OUT", help="File to write (.pt for TorchScript, .onnx)."),
    height: int = typer.Option(400, help="Input height the graph is traced for (fixed)."),
    width: int = typer.Option(600, help="Input width the graph is traced for (fixed)."),
    batch: int = typer.Option(1, help="Batch size the graph is traced for (fixed)."),
) -> None:
    """Export enhancer + SKB as one traced graph for a fixed (batch, 3, height, width) input."""
    from components.export import FORMATS, export_enhancer
    from components.serving import load_enhancer

    if fmt not in FORMATS:
        raise typer.BadParameter(f"expected one of {', '.join(FORMATS)}", param_hint="--format")
    enhancer = load_enhancer(model, device="cpu")
    try:
        path = export_enhancer(enhancer, out, fmt, height=height, width=width, batch=batch)  # type: ignore[arg-type]
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"exported {fmt} for input ({batch}, 3, {height}, {width}) to {path}")


def promote_command(
    name: str = typer.Argument(..., help="Registered model name, e.g. skf-lol-v2."),
    version: str = typer.Argument(..., help="Model version to consider for champion."),
    primary: str = typer.Option("psnr", help="Primary metric."),
    lower_is_better: bool = typer.Option(False, help="The primary metric is better when lower."),
    margin: float = typer.Option(0.0, help="Required gain of the primary metric over the champion."),
) -> None:
    """Promote VERSION to champion if it beats the current one (same dataset version and protocol)."""
    from components.model_registry import PromotionPolicy, promote

    policy = PromotionPolicy(primary=primary, higher_is_better=not lower_is_better, margin=margin)
    decision = promote(name, version, policy)
    typer.echo(decision.to_markdown())


def register(app: typer.Typer) -> None:
    app.command("enhance")(enhance_command)
    app.command("export")(export_command)
    app.command("promote")(promote_command)
