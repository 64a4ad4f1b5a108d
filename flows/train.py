"""Prefect flow ``train-model``: train a planned recipe on a dataset version, resumably, once.

- planning (request -> plan, before any work): :mod:`components.training.plan`
- the job (config hash, catalog row and lease, MLflow run, training, enhancer package):
  :func:`components.training.job.run_training`
- here: the ``train`` task (tag ``gpu``, under the ``gpu`` concurrency limit) and the markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.training.job import progress_every_tenth, run_training, train_markdown
from components.training.plan import TrainingPlan, TrainingRequest, plan

__all__ = ["GPU_TAG", "ensure_gpu_limit", "train_model", "train_task"]

GPU_TAG = "gpu"


def ensure_gpu_limit(limit: int = 1) -> None:
    """Create the tag concurrency limit ``gpu`` (= ``prefect concurrency-limit create gpu 1``) if missing.

    Best effort: an API without tag limits, or a race with another flow creating it, only logs.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_concurrency_limit_by_tag(GPU_TAG)
            except ObjectNotFound:
                client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)
                logger.info("created the '%s' task concurrency limit (%d)", GPU_TAG, limit)
    except Exception as exc:  # an older/foreign API: the limit is an optimisation, not a requirement
        logger.warning("could not ensure the '%s' concurrency limit: %s", GPU_TAG, exc)


@task(name="train", tags=[GPU_TAG])
def train_task(version_ref: str, training_plan: TrainingPlan, stop_after_step: int | None) -> dict[str, Any]:
    logger = get_run_logger()
    outcome = run_training(
        version_ref,
        training_plan,
        progress=progress_every_tenth(logger.info),
        stop_after_step=stop_after_step,
        log=logger.info,
    )
    return outcome.to_dict()


@flow(name="train-model")
def train_model(
    version_ref: str,
    training_plan: TrainingPlan | TrainingRequest,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """Train ``training_plan`` on dataset version ``version_ref``.

    Given a :class:`TrainingRequest` instead of a plan (this flow run on its own), it is planned here,
    before any work. Returns ``run_id``, ``checkpoint_uri``, ``config_hash``, ``status``
    (trained/resumed/skipped/joined), ``steps`` and the last metrics. A finished run of the same
    configuration is reused as is.
    """
    if isinstance(training_plan, TrainingRequest):
        training_plan = plan(training_plan)  # bad parameters fail here, before any work
    ensure_gpu_limit()
    outcome = train_task(version_ref, training_plan, stop_after_step)
    create_markdown_artifact(
        markdown=train_markdown(outcome, training_plan),
        key="train-" + outcome["config_hash"][:16],
        description=f"Training of {training_plan.recipe.name} on {outcome['dataset_version']}",
    )
    return outcome
