"""Prefect flow ``train-skb``: train the scene segmenter ``skb/scene-segmenter@1`` on a labelled version.

- the job (config hash, MLflow run in ``skf-segmenter``, safetensors + JSON package, registration):
  :func:`components.segmenter.job.run_segmenter_training`
- here: the ``train-segmenter`` task (tag ``gpu``, per-host slots as in :mod:`flows.train`; one retry for
  transient failures) and the markdown artifact with the metrics.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.errors import SKFError
from components.segmenter.job import (
    DEFAULT_MODEL_NAME,
    make_config,
    run_segmenter_training,
    segmenter_markdown,
)
from components.segmenter.training import SegmenterConfig
from components.training.job import progress_every_tenth
from flows.train import GPU_TAG

__all__ = ["train_segmenter_task", "train_skb"]

# Bad input (unlabelled dataset, bad setting, unknown version) fails the same way on every try.
_PERMANENT = (SKFError, ValueError, LookupError)


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    return not isinstance(state.data, _PERMANENT)


# Never cache the result: whether work is needed is decided by the finished MLflow run of the config hash.
@task(
    name="train-segmenter",
    tags=[GPU_TAG],
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
)
def train_segmenter_task(
    version_ref: str, config: SegmenterConfig, device: str | None, model_name: str, register_model: bool
) -> dict[str, Any]:
    logger = get_run_logger()
    outcome = run_segmenter_training(
        version_ref,
        config,
        device=device,
        model_name=model_name,
        register=register_model,
        progress=progress_every_tenth(logger.info),
        log=logger.info,
    )
    return outcome.to_dict()


@flow(name="train-skb")
def train_skb(
    version_ref: str,
    steps: int | None = None,
    overrides: dict[str, Any] | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    register_model: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Train the scene segmenter on ``version_ref`` (or reuse the finished run of the same config).

    ``overrides`` are :class:`~components.segmenter.training.SegmenterConfig` fields; a bad one fails
    here, before any work. Returns the run, the registered version (``checkpoint``: what to pass as
    ``--checkpoint`` / ``skb_checkpoint``) and the metrics.
    """
    config = make_config(overrides, steps=steps)
    outcome = train_segmenter_task(version_ref, config, device, model_name, register_model)
    create_markdown_artifact(
        markdown=segmenter_markdown(outcome),
        key="train-skb-" + outcome["config_hash"][:16],
        description=f"Scene segmenter trained on {outcome['dataset_version']}",
    )
    get_run_logger().info(
        "segmenter %s: test mIoU %s, checkpoint %s",
        outcome["status"],
        f"{outcome['metrics']['test/miou']:.4f}" if "test/miou" in outcome["metrics"] else "n/a",
        outcome["checkpoint"],
    )
    return outcome
