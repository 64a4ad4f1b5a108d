"""``skf train-skb``: train the scene segmenter (``skb/scene-segmenter@1``) on a labelled dataset version.

Runs the same job as the ``train-skb`` flow (:func:`components.segmenter.job.run_segmenter_training`)
directly, with a progress bar; no Prefect API is needed.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from flows.commands._progress import progress_bar
from flows.commands.pipeline import parse_overrides


def train_skb_command(
    version_ref: str = typer.Argument(
        ..., help="Labelled dataset version, e.g. scenes@1 (or scenes for the latest)."
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (default: 300)."),
    override: list[str] = typer.Option(
        [],
        "--set",
        help="Training setting KEY=VALUE (repeatable): batch_size, crop, lr, val_fraction, seed, ...",
    ),
    model_name: str | None = typer.Option(
        None, "--model-name", help="Registered model name (default: skf-scene-segmenter)."
    ),
    register_model: bool = typer.Option(
        True, "--register/--no-register", help="Register the segmenter in MLflow (alias challenger)."
    ),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
) -> None:
    """Train (or reuse) the scene segmenter on VERSION_REF's low-light images; prints its test metrics."""
    # Failures are SKFErrors, left to the CLI boundary (flows.cli.main): one `error:` line on stderr.
    from components.segmenter.job import DEFAULT_MODEL_NAME, make_config, run_segmenter_training

    console = Console()
    config = make_config(parse_overrides(override), steps=steps)
    with progress_bar(console) as bar:
        task_id = bar.add_task("segmenter", total=config.steps, info="")

        def progress(p: Any) -> None:
            info = f"loss={p.loss:.4f}" + (f" val/miou={p.val.miou:.3f}" if p.val is not None else "")
            bar.update(task_id, completed=p.step, info=info)

        outcome = run_segmenter_training(
            version_ref,
            config,
            device=device,
            model_name=model_name or DEFAULT_MODEL_NAME,
            register=register_model,
            progress=progress,
            log=lambda msg: bar.console.print(msg, soft_wrap=True, markup=False),
        )
    console.print(outcome_table(outcome))
    console.print(_usage(outcome), soft_wrap=True, markup=False)


def outcome_table(outcome: Any) -> Table:
    """The run, the registered version and the metrics, one row each."""
    table = Table(title=f"scene segmenter on {outcome.dataset_version}: {outcome.status}")
    table.add_column("")
    table.add_column("", overflow="fold")
    registered = f"models:/{outcome.model_name}/{outcome.model_version}" if outcome.model_version else "no"
    rows = [
        ("MLflow run", outcome.run_id),
        ("registered", registered + (" (challenger)" if outcome.challenger else "")),
        ("weights sha256", outcome.sha256),
        ("classes", ", ".join(outcome.classes)),
        ("steps", f"{outcome.steps} ({outcome.seconds:.1f} s)"),
        *((k, f"{v:.4f}") for k, v in sorted(outcome.metrics.items())),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _usage(outcome: Any) -> str:
    from components.segmenter import SCENE_SEGMENTER_SPEC

    ref, ckpt = outcome.dataset_version, outcome.checkpoint
    return (
        f"use it:  skf precompute {ref} --skb {SCENE_SEGMENTER_SPEC} --checkpoint {ckpt}\n"
        f"         skf train {ref} --skb {SCENE_SEGMENTER_SPEC} --skb-checkpoint {ckpt}"
    )


def register(app: typer.Typer) -> None:
    app.command("train-skb")(train_skb_command)
