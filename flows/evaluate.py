"""Prefect flow ``evaluate-model``: score a trained run or a registered model on a dataset version.

The job is :func:`components.evaluation.job.run_evaluation` (what is scored, where it is recorded, when it
is skipped); this flow runs it as a ``gpu``-tagged task and publishes the metric table, the report and
the labelled sample grid (an image artifact) as Prefect artifacts.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from components.evaluation.job import evaluation_markdown, metric_table, run_evaluation
from flows.states import done_or_skipped

__all__ = ["evaluate_model", "evaluate_task"]


@task(name="evaluate", tags=["gpu"])
def evaluate_task(
    model: str,
    version_ref: str,
    protocol: str,
    unpaired_refs: list[str],
    device: str | None,
    force: bool = False,
) -> dict[str, Any]:
    logger = get_run_logger()
    return run_evaluation(
        model, version_ref, protocol, unpaired_refs, device=device, force=force, log=logger.info
    )


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


@flow(name="evaluate-model")
def evaluate_model(
    model_uri_or_run_id: str,
    version_ref: str,
    protocol: str = "raw",
    unpaired_refs: list[str] | None = None,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate a run (id) or registered model (``models:/...``) on ``version_ref``'s test split.

    Returns the metrics (``test/psnr``, ...), unavailable metrics with reasons, and the URIs of the
    per-image CSV, the crop grid and the report on the MLflow run. ``force`` recomputes an evaluation
    already recorded on the run (e.g. one with unavailable metrics) and overwrites it.
    """
    from components.evaluation import get_protocol

    get_protocol(protocol)  # an unknown protocol fails before any work
    result = evaluate_task(
        model_uri_or_run_id, version_ref, protocol, list(unpaired_refs or []), device, force
    )
    key = _key(f"eval-{result['run_id'][:8]}-{result['protocol']}-{result['dataset_version']}")
    create_table_artifact(table=metric_table(result), key=key + "-metrics", description="Evaluation metrics")
    create_markdown_artifact(
        markdown=evaluation_markdown(result) + "\n" + result.get("markdown", ""),
        key=key,
        description=f"Evaluation of {result['model']} on {result['dataset_version']}",
    )
    create_image_artifact(
        image_url=result["grid_uri"],
        key=key + "-grid",
        description=f"input | output | reference, PSNR per image; {result.get('headline', '')}",
    )
    summary = {k: v for k, v in result.items() if k != "markdown"}
    reason = "already evaluated: the metrics recorded on the run" if result["status"] == "skipped" else None
    return done_or_skipped(summary, reason)
