"""``skf enhance``, ``skf export`` and ``skf promote``: use and manage registered enhancers."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from components.errors import SKFError, UserInputError
from components.serving import IMAGE_SUFFIXES, read_image, write_image

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MODEL_HELP = "MLflow model URI: models:/<name>@champion, models:/<name>/<version>, runs:/<run>/enhancer or a model dir."


def _inputs(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise typer.BadParameter(f"{source} does not exist", param_hint="IN")


def _targets(source: Path, dest: Path, files: list[Path], overwrite: bool) -> list[Path]:
    """Where each input is written; refuses to replace an input image unless ``overwrite``."""
    if source.is_file():
        targets = [dest / source.name if dest.is_dir() else dest]
    else:
        targets = [dest / path.name for path in files]
    clobbered = [t for t, f in zip(targets, files, strict=True) if t.resolve() == f.resolve()]
    if clobbered and not overwrite:
        where = f"folder {dest}" if source.is_dir() else f"file {targets[0]}"
        raise UserInputError(
            f"OUT {where} would overwrite {len(clobbered)} input image(s) such as {clobbered[0]}; choose another "
            "OUT or pass --overwrite to replace the originals"
        )
    return targets


#: Per-file failures that skip the file, not the batch: unreadable or oversized images, a decoder's
#: internal errors (truncated data), an enhancement that fails on one image (e.g. out of memory), a
#: write that fails.
_SKIPPABLE: tuple[type[BaseException], ...] = (
    SKFError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    RuntimeError,
    MemoryError,
    zlib.error,
)


def _enhance_file(enhancer: Any, path: Path, target: Path) -> None:
    from components.serving import enhance_image

    write_image(target, enhance_image(enhancer, read_image(path)))


def enhance_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    source: Path = typer.Argument(..., metavar="IN", help="An image file or a folder of images."),
    dest: Path = typer.Argument(..., metavar="OUT", help="Output file (for a file IN) or folder."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Allow OUT to replace the input images (e.g. `skf enhance IN IN`)."
    ),
) -> None:
    """Enhance images with a registered model, keeping file names and bit depth (16-bit stays 16-bit).

    Unreadable, oversized (over SKF_MAX_ENHANCE_PIXELS) or failing files are skipped with a message; the
    exit code is 0 when at least one image was written. Images with a side over SKF_ENHANCE_TILE are
    enhanced in overlapping tiles to bound memory. OUT never replaces an input unless --overwrite.
    """
    from components.serving import load_enhancer

    files = _inputs(source)
    if not files:
        typer.echo(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}", err=True)
        raise typer.Exit(1)
    targets = _targets(source, dest, files, overwrite)
    enhancer = load_enhancer(model, device=device)
    done, skipped = 0, []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("enhancing", total=len(files))
        for path, target in zip(files, targets, strict=True):
            try:
                _enhance_file(enhancer, path, target)
            except _SKIPPABLE as exc:
                skipped.append(path.name)
                reason = str(exc) if isinstance(exc, SKFError) else f"{path}: {type(exc).__name__}: {exc}"
                progress.console.print(f"[yellow]skipped[/] {escape(reason)}", soft_wrap=True)
            else:
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
    height: int = typer.Option(
        400, help="Input height: TorchScript's fixed size; for ONNX the size it is checked at (any H works)."
    ),
    width: int = typer.Option(
        600, help="Input width: TorchScript's fixed size; for ONNX the size it is checked at (any W works)."
    ),
    batch: int = typer.Option(1, help="Batch size the graph is exported for (fixed)."),
    layout: str = typer.Option("nchw", help="nchw (B,3,H,W) or nhwc (B,H,W,3, as the pyfunc model takes)."),
) -> None:
    """Export enhancer + SKB as one graph: ONNX with dynamic height and width, TorchScript for one size."""
    from components.export import FORMATS, LAYOUTS, export_enhancer
    from components.serving import load_enhancer

    if fmt not in FORMATS:
        raise typer.BadParameter(f"expected one of {', '.join(FORMATS)}", param_hint="--format")
    if layout not in LAYOUTS:
        raise typer.BadParameter(f"expected one of {', '.join(LAYOUTS)}", param_hint="--layout")
    enhancer = load_enhancer(model, device="cpu")
    path = export_enhancer(enhancer, out, fmt, height=height, width=width, batch=batch, layout=layout)  # type: ignore[arg-type]
    if fmt == "onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        shape = meta["skf.input_shape"].replace("x", ", ")
        if meta.get("skf.dynamic_shape") == "true":
            shape += f"; H, W >= {meta['skf.min_side']}"
    else:
        dims = (batch, height, width, 3) if layout == "nhwc" else (batch, 3, height, width)
        shape = ", ".join(map(str, dims))
    typer.echo(f"exported {fmt} for input ({shape}) ({layout.upper()}) to {path}")


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


def import_released_command(
    baseline: str = typer.Argument(..., help="Baseline spec or name, e.g. baseline/llflow-l@1."),
    checkpoint: str = typer.Argument(..., help="The released file (path, s3:// or https://)."),
    sha256: str = typer.Option(..., "--sha256", help="Full sha256 of that file (checked before it is read)."),
    name: str = typer.Option(..., "--name", help="Registered model name, e.g. llflow-l-skf-released."),
    plain: bool = typer.Option(False, "--plain", help="A plain baseline checkpoint (no SE blocks, no SKB)."),
    skb: str = typer.Option("skb/hrnet-w48-pascal@1", help="SKB spec the SE blocks were trained with."),
    skb_checkpoint: str | None = typer.Option(None, help="HRNet checkpoint path/URI (pinned, see README)."),
    bn_mode: str | None = typer.Option(None, help="Override the released test's SKB BN mode (eval|train)."),
    override: list[str] = typer.Option([], "--set", help="Network size override model.KEY=VALUE."),
) -> None:
    """Register an author-released checkpoint (loaded strictly) as a model `skf evaluate` can score."""
    from components.released import import_released
    from flows.commands.pipeline import parse_overrides

    model = {k.removeprefix("model."): v for k, v in parse_overrides(override).items()}
    settings = {"bn_mode": bn_mode} if bn_mode else None
    result = import_released(
        baseline, checkpoint, sha256=sha256, name=name, skf=not plain, skb=skb, skb_checkpoint=skb_checkpoint,
        skb_settings=settings, model=model,
    )  # fmt: skip
    typer.echo(
        f"registered {result.model_uri} ({result.baseline}, {result.tensors} tensors, sha256 "
        f"{result.checkpoint_sha256[:12]}...); next: skf evaluate {result.model_uri} NAME@V --protocol paper-gt-mean"
    )


def register(app: typer.Typer) -> None:
    app.command("import-released")(import_released_command)
    app.command("enhance")(enhance_command)
    app.command("export")(export_command)
    app.command("promote")(promote_command)
