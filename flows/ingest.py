"""Prefect flow ``ingest-dataset``: ingest a folder, archive or ``s3://`` prefix as a dataset version."""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.data.ingest import ingest, summary_markdown
from components.errors import SKFError
from flows.states import done_or_skipped

# Bad input (wrong layout, missing source, nothing valid, corrupt bytes, an archive over the limits) is an
# SKFError and fails the same way on every try; so do the ValueError/LookupError of a bad argument.
_PERMANENT = (SKFError, ValueError, LookupError)


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry only failures that may go away (network, storage, database busy), not bad input."""
    return not isinstance(state.data, _PERMANENT)


@task(name="ingest-source", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def ingest_source(source: str, name: str, layout: str) -> dict[str, Any]:
    result = ingest(source, name=name, layout=layout)
    get_run_logger().info(
        "%s %s: %s, %d quarantined",
        "created" if result.created else "unchanged",
        result.ref,
        result.counts,
        len(result.quarantined),
    )
    return result.to_dict()


def _artifact_key(name: str) -> str:
    return "ingest-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset")


@flow(name="ingest-dataset", log_prints=True)
def ingest_dataset(source: str, name: str, layout: str = "auto") -> dict[str, Any]:
    """Ingest ``source`` as dataset ``name``; returns the JSON-able ingest summary (ref, counts, quarantine)."""
    summary = ingest_source(source, name, layout)
    create_markdown_artifact(
        markdown=summary_markdown(summary),
        key=_artifact_key(name),
        description=f"Ingest summary for {summary['ref']}",
    )
    unchanged = f"identical content is already {summary['ref']}" if not summary["created"] else None
    return done_or_skipped(summary, unchanged)
