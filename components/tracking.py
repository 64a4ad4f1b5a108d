"""MLflow tracking: the client on the configured tracking URI, the pipeline's experiment and run look-ups.

Every job that reads or writes runs (training, evaluation, registration) gets its client from
:func:`mlflow_client`, which also makes the tracking URI and the experiment MLflow's current ones. The
experiment is named by ``MLFLOW_EXPERIMENT_NAME`` (default ``skf``), resolved only by
:func:`experiment_name` (from :class:`~components.settings.Settings`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

__all__ = [
    "CONFIG_HASH_TAG",
    "DATASET_KEYS",
    "PROTOCOL_KEYS",
    "experiment_name",
    "finished_run",
    "mlflow_client",
    "recorded_evaluation",
    "registration_of",
]

CONFIG_HASH_TAG = "skf.config_hash"
#: Where a training run records the dataset version and the evaluation protocol (params or tags).
DATASET_KEYS = ("dataset_version", "dataset.version", "data.version_ref")
PROTOCOL_KEYS = ("eval/protocol", "protocol")


def experiment_name() -> str:
    """The MLflow experiment of the pipeline's runs: ``MLFLOW_EXPERIMENT_NAME``, default ``skf``."""
    from components.settings import get_settings

    return get_settings().mlflow_experiment_name


def mlflow_client() -> Any:
    """A client on the configured tracking URI, which also becomes MLflow's current one."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in flow logs
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.settings import get_settings

    settings = get_settings()
    uri, experiment = settings.mlflow_tracking_uri, settings.mlflow_experiment_name
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:  # created quietly (set_experiment logs to stderr)
        with contextlib.suppress(MlflowException):  # a concurrent command created it first
            client.create_experiment(experiment)
    # Fluent calls (Model.log inside registration) create logged models in the *active* experiment; on
    # the file store a model outside its run's experiment cannot be read back, so make ours the active one.
    mlflow.set_experiment(experiment)
    return client


def finished_run(client: Any, config_hash: str) -> Any:
    """The finished MLflow run tagged with ``config_hash`` in :func:`experiment_name`, or ``None``."""
    exp = client.get_experiment_by_name(experiment_name())
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


def _lookup(run: Any, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        for source in (run.data.params, run.data.tags):
            if source.get(key):
                return str(source[key])
    return None


def recorded_evaluation(run_id: str, metric_prefix: str) -> dict[str, Any]:
    """Dataset version, protocol and ``<prefix>*`` metrics recorded on a training run (None if absent)."""
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    metrics = {k: float(v) for k, v in run.data.metrics.items() if k.startswith(metric_prefix)}
    return {
        "dataset_version": _lookup(run, DATASET_KEYS),
        "protocol": _lookup(run, PROTOCOL_KEYS),
        "metrics": metrics,
    }


def registration_of(run_id: str, name: str) -> dict[str, Any] | None:
    """The model version already registered from ``run_id`` under ``name`` (with its decision), if any.

    The version is re-read with ``get_model_version``: ``search_model_versions`` returns versions
    without their aliases, which would report the ``challenger`` as not holding the alias.
    """
    client = mlflow_client()
    escaped = name.replace("'", "\\'")
    versions = client.search_model_versions(f"name = '{escaped}' and run_id = '{run_id}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    mv = client.get_model_version(name, str(newest.version))
    tags = dict(mv.tags)
    aliases = set(mv.aliases or [])
    decision = None
    if "skf.promotion.decision" in tags:
        decision = {
            "promoted": tags["skf.promotion.decision"] == "promoted",
            "reason": tags.get("skf.promotion.reason", ""),
        }
    return {
        "name": mv.name,
        "version": str(mv.version),
        "model_uri": mv.source,
        "challenger": "challenger" in aliases,
        "decision": decision,
        "status": "skipped",
    }
