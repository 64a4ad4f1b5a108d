"""Prefect flow ``precompute-priors``: fill the SKB prior cache for a dataset version."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components import registry
from components.precompute import DEFAULT_SKB, DEFAULT_SPLITS, PrecomputeSummary, precompute_priors
from flows.states import done_or_skipped

# Bad parameters (unknown dataset or SKB, bad checkpoint hash) fail the same way on every try; the
# dataset/component lookup errors are LookupErrors.
_PERMANENT = (ValueError, LookupError)


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    return not isinstance(state.data, _PERMANENT)


# Never cache this task's result: whether work is needed is decided by the prior cache itself, so a
# rerun after deleting or damaging entries must really run.
@task(
    name="compute-priors",
    tags=["gpu"],
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
)
def compute_priors(
    version_ref: str, skb_spec: str, checkpoint: str | None, batch_size: int, splits: list[str]
) -> PrecomputeSummary:
    """Run the component; a retry only redoes what is still missing (cached entries are skipped)."""
    logger = get_run_logger()
    last = [-1]

    def progress(done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done // step != last[0]:
            last[0] = done // step
            logger.info("priors: %d/%d images", done, total)

    return precompute_priors(
        version_ref, skb_spec, checkpoint=checkpoint, batch_size=batch_size, splits=splits, progress=progress
    )


def log_table(rows: Sequence[tuple[str, str]]) -> str:
    """A fixed-width two-column table for the run log."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)


def _artifact_key(version_ref: str) -> str:
    return "priors-" + (re.sub(r"[^a-z0-9]+", "-", version_ref.lower()).strip("-") or "dataset")


@flow(name="precompute-priors")
def precompute_priors_flow(
    version_ref: str,
    skb_spec: str = DEFAULT_SKB,
    checkpoint: str | None = None,
    batch_size: int = 4,
    splits: list[str] = list(DEFAULT_SPLITS),  # noqa: B006 - Prefect parameters are copied per run
    allow_failures: bool = False,
) -> dict[str, Any]:
    """Cache the priors of ``version_ref`` under the SKB ``skb_spec``; returns the summary as a dict.

    Fails (after publishing the summary) when some image could not be processed, unless
    ``allow_failures``: training must not start with priors missing.
    """
    logger = get_run_logger()
    skb_spec = registry.resolved_spec(skb_spec)  # unknown specs fail here, listing what exists
    summary = compute_priors(version_ref, skb_spec, checkpoint, batch_size, list(splits))
    create_markdown_artifact(
        markdown=summary.to_markdown(),
        key=_artifact_key(summary.version_ref or version_ref),
        description=f"Prior cache for {summary.version_ref} with {summary.skb_spec_resolved}",
    )
    logger.info("prior cache summary\n%s", log_table(summary.rows()))
    if summary.oracle:
        logger.warning(
            "SKB %s is an ORACLE: its priors come from ground-truth label maps (a benchmark's upper "
            "bound); models trained on them are never promoted",
            summary.skb_spec_resolved,
        )
    elif not summary.pretrained:
        logger.warning(
            "SKB %s ran WITHOUT a checkpoint (random init): these priors carry no semantics; "
            "models trained on them must never be promoted",
            summary.skb_spec_resolved,
        )
    if summary.failed and not allow_failures:
        raise RuntimeError(
            f"priors failed for {summary.failed} of {summary.total} images of {summary.version_ref} "
            f"(first: {next(iter(summary.errors.items()))}); see the artifact, fix and rerun"
        )
    nothing_new = summary.computed == 0 and summary.failed == 0
    return done_or_skipped(summary.as_dict(), f"all {summary.cached} priors cached" if nothing_new else None)
