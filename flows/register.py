"""Prefect flow ``register-model``: log a trained enhancer as an MLflow pyfunc, register it, try to promote it.

Input is the training run: its ``enhancer-package`` artifact folder (spec JSON + safetensors, written by
:func:`components.model_registry.log_enhancer_package`), its evaluation metrics and the dataset version
and protocol they were computed on (taken from the run unless given). The decision is published as a
markdown artifact and as tags on the run and the model version.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components import model_registry as mr
from components.tracking import DATASET_KEYS, PROTOCOL_KEYS, recorded_evaluation


@task(name="read-run")
def read_run(run_id: str, metric_prefix: str) -> dict[str, Any]:
    """Dataset version, protocol and ``<prefix>*`` metrics recorded on the training run."""
    return recorded_evaluation(run_id, metric_prefix)


@task(name="log-and-register", retries=2, retry_delay_seconds=5)
def log_and_register(
    run_id: str,
    package_uri: str,
    name: str | None,
    dataset_version: str,
    protocol: str,
    metrics: dict[str, float],
) -> dict[str, Any]:
    enhancer = mr.load_enhancer_package(package_uri)
    reg = mr.log_enhancer(
        enhancer,
        run_id=run_id,
        name=name,
        dataset_version=dataset_version,
        protocol=protocol,
        metrics=metrics,
    )
    return {
        "name": reg.name,
        "version": reg.version,
        "model_uri": reg.model_uri,
        "challenger": reg.challenger,
    }


@task(name="promote")
def promote_version(name: str, version: str, policy: dict[str, Any]) -> mr.PromotionDecision:
    return mr.promote(name, version, mr.PromotionPolicy.from_dict(policy))


@flow(name="register-model")
def register_model(
    run_id: str,
    name: str | None = None,
    dataset_version: str | None = None,
    protocol: str | None = None,
    metrics: dict[str, float] | None = None,
    package_path: str = mr.PACKAGE_PATH,
    metric_prefix: str = "test/",
    primary: str = "psnr",
    higher_is_better: bool = True,
    margin: float = 0.0,
    promote: bool = True,
) -> dict[str, Any]:
    """Register the enhancer of training run ``run_id`` (as ``name``, default ``skf-<dataset>``) and
    promote it when it beats the champion; returns the registration and the decision as plain data."""
    logger = get_run_logger()
    recorded = read_run(run_id, metric_prefix)
    dataset_version = dataset_version or recorded["dataset_version"]
    protocol = protocol or recorded["protocol"]
    metrics = metrics if metrics is not None else recorded["metrics"]
    if not dataset_version or not protocol:
        raise ValueError(
            f"run {run_id} records no dataset version ({'/'.join(DATASET_KEYS)}) or evaluation protocol "
            f"({'/'.join(PROTOCOL_KEYS)}): pass dataset_version= and protocol="
        )
    reg = log_and_register(
        run_id, f"runs:/{run_id}/{package_path}", name, dataset_version, protocol, dict(metrics)
    )
    logger.info("registered %s version %s (%s)", reg["name"], reg["version"], reg["model_uri"])
    result: dict[str, Any] = {**reg, "decision": None}
    if promote:
        policy = mr.PromotionPolicy(primary=primary, higher_is_better=higher_is_better, margin=margin)
        decision = promote_version(reg["name"], reg["version"], policy.to_dict())
        create_markdown_artifact(
            markdown=decision.to_markdown(),
            key=_artifact_key(reg["name"]),
            description=f"Promotion decision for {reg['name']} version {reg['version']}",
        )
        logger.info("promotion: %s", decision.reason)
        result["decision"] = {"promoted": decision.promoted, "reason": decision.reason, **decision.tags()}
    return result


def _artifact_key(name: str) -> str:
    return "promotion-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model")
