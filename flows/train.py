"""Prefect flow ``train-model``: train a planned recipe on a dataset version, resumably, once.

- planning (request -> plan, before any work): :mod:`components.training.plan`
- the job (config hash, catalog row and lease, MLflow run, training, enhancer package):
  :func:`components.training.job.run_training`
- here: the ``train`` task (tag ``gpu``) and the markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.training.job import progress_every_tenth, run_training, train_markdown
from components.training.plan import TrainingPlan, TrainingRequest, plan
from flows.states import done_or_skipped

__all__ = ["GPU_TAG", "train_model", "train_task"]

#: A label on the tasks that use the accelerator (train, evaluate, precompute), for filtering runs. It
#: carries no concurrency limit: GPU slots are per host, the ``--limit`` of the worker on that host
#: (``infra/compose.yaml``), so N GPU hosts run N jobs and the CPU demo's pool holds none of them.
GPU_TAG = "gpu"


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
    outcome = train_task(version_ref, training_plan, stop_after_step)
    create_markdown_artifact(
        markdown=train_markdown(outcome, training_plan),
        key="train-" + outcome["config_hash"][:16],
        description=f"Training of {training_plan.recipe.name} on {outcome['dataset_version']}",
    )
    reason = None
    if outcome["status"] == "skipped":
        reason = f"finished run {outcome['run_id']} has this configuration ({outcome['config_hash'][:12]})"
    return done_or_skipped(outcome, reason)
