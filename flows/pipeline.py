"""Parent flows: ``skf-train`` (ingest -> precompute-priors -> train -> evaluate -> register) and ``skf-retrain``.

Parameters are one typed model, :class:`~components.pipeline.params.SkfTrainParams`, usually a preset from
``configs/pipelines/`` with a few fields overridden (``{"preset": "lol-v2", "dataset": {"source": "s3://..."}}``). Every check that can
fail without touching data -- component specs, layout, recipe and overrides, protocol, metric names -- runs
while the parameters are validated, so a bad request fails before any stage starts.

A ``preflight`` task then checks the services and inputs the run needs (storage, MLflow, the data source,
the SKB checkpoint; :mod:`components.pipeline.preflight`), so a missing object fails before the download.

Each stage is a subflow that skips work it has already done for the same inputs: ingest returns the
existing version for identical content, precompute computes only missing priors, training reuses a finished
run with the same config hash (and resumes an unfinished one from its checkpoint), evaluation is recorded on
the run, and a run already registered is not registered again. A rerun after a failure therefore resumes
where it stopped. Every run ends with a markdown artifact summarising what it did.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.pipeline.params import (
    DEMO_DIRNAME,
    PRESETS_DIR,
    PresetError,
    SkfTrainParams,
    available_presets,
    eval_metrics,
    load_preset,
    resolve_params,
)
from components.pipeline.summary import summary_markdown
from components.training.plan import OFF
from flows.logs import ship_project_logs

ship_project_logs()  # the project's warnings reach the Prefect UI of every run these flows make

__all__ = [
    "OFF",
    "DEMO_DIRNAME",
    "PRESETS_DIR",
    "PresetError",
    "SkfTrainParams",
    "available_presets",
    "load_preset",
    "resolve_params",
    "skf_retrain",
    "skf_train",
    "summary_markdown",
]


# --------------------------------------------------------------------------------------------------
# Stages that are not flows of their own
# --------------------------------------------------------------------------------------------------
def demo_source(source: str | None) -> Path:
    from components.settings import get_settings

    return Path(source).expanduser() if source else get_settings().home / DEMO_DIRNAME


@task(name="prepare-source", retries=2, retry_delay_seconds=2)
def prepare_source(source: str | None, demo: bool) -> str:
    """The URI to ingest; for the demo, generate the dataset there first unless it already exists."""
    if not demo:
        assert source is not None
        return source
    from components.data.demo import generate_demo_dataset

    root = demo_source(source)
    if not (root / "our485").is_dir() or not (root / "eval15").is_dir():
        get_run_logger().info("generating the demo dataset in %s", root)
        generate_demo_dataset(root, overwrite=True)
    return str(root)


@task(name="find-registration", retries=2, retry_delay_seconds=2)
def find_registration(run_id: str, name: str) -> dict[str, Any] | None:
    """The model version already registered from ``run_id`` under ``name`` (with its decision), if any."""
    from components.tracking import registration_of

    return registration_of(run_id, name)


def _register(params: SkfTrainParams, run_id: str, version_ref: str, evaluation: Mapping[str, Any]) -> Any:
    """Register the run (once per model name) and apply the promotion policy to the new version."""
    from components.model_registry import default_model_name
    from flows.register import promote_version, register_model

    name = params.registry.model_name or default_model_name(version_ref)
    registered = find_registration(run_id, name)
    if registered is not None:
        return registered
    registered = register_model(
        run_id,
        name=name,
        dataset_version=version_ref,
        protocol=evaluation["protocol"],
        metrics=eval_metrics(evaluation),
        promote=False,
    )
    registered["status"] = "registered"
    if params.registry.promote:
        policy = params.registry.promotion.policy()
        decision = promote_version(registered["name"], registered["version"], policy)
        registered["decision"] = {"promoted": decision.promoted, "reason": decision.reason}
    return registered


def _artifact_key(prefix: str, name: str) -> str:
    return f"{prefix}-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset")


def _publish_summary(markdown: str, dataset: str, flow: str = "skf-train", failed: bool = False) -> str:
    """The run's summary (:func:`summary_markdown`) as the ``<flow>-<dataset>`` markdown artifact."""
    create_markdown_artifact(
        markdown=markdown,
        key=_artifact_key(flow, dataset),
        description=f"{flow} summary" + (" (failed)" if failed else ""),
    )
    return markdown


@task(name="preflight", retries=1, retry_delay_seconds=5)
def check_services(params: SkfTrainParams) -> list[str]:
    """Storage, MLflow, the data source and the SKB checkpoint exist and answer, before any work."""
    from components.pipeline.preflight import preflight
    from components.settings import get_settings

    settings = get_settings()
    report = preflight(
        source=None if params.dataset.demo else params.dataset.source,
        skb_checkpoint=params.plan().skb_checkpoint,
        storage_uri=settings.storage_uri,
        tracking_uri=settings.mlflow_tracking_uri,
    )
    logger = get_run_logger()
    for line in report.checked:
        logger.info("preflight: %s", line)
    return list(report.checked)


def _train_evaluate_register(params: SkfTrainParams, stages: dict[str, Any]) -> None:
    """Priors, training, evaluation and registration on the version in ``stages["ingest"]``; each stage's
    result is added to ``stages`` as it finishes (so a failure's summary shows how far it got)."""
    from flows.evaluate import evaluate_model
    from flows.precompute import precompute_priors_flow
    from flows.train import train_model

    training_plan = params.plan()  # made once, when the parameters were validated
    version_ref = stages["ingest"]["ref"]
    stages["priors"] = None
    if training_plan.skb is not None and training_plan.recipe.skf.skb_mode == "cached":
        stages["priors"] = precompute_priors_flow(
            version_ref,
            training_plan.skb,
            checkpoint=training_plan.skb_checkpoint,
            batch_size=params.precompute_batch_size,
            splits=["train"],
        )
    stages["train"] = train_model(version_ref, training_plan, params.training.stop_after_step)
    run_id = stages["train"]["run_id"]
    evaluation = params.evaluation
    stages["evaluate"] = evaluate_model(
        run_id, version_ref, evaluation.protocol, list(evaluation.unpaired_refs)
    )
    stages["register"] = _register(params, run_id, version_ref, stages["evaluate"])


# --------------------------------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------------------------------
def _train_run_name() -> str:
    """``<preset or baseline>-<dataset>``: what a flow run trains, readable in the Prefect UI."""
    from prefect.runtime import flow_run

    raw = flow_run.parameters.get("params")
    data = raw.model_dump(exclude_unset=True) if isinstance(raw, SkfTrainParams) else dict(raw or {})
    try:
        preset = load_preset(str(data["preset"])) if data.get("preset") else {}
    except PresetError:
        preset = {}
    dataset = {**(preset.get("dataset") or {}), **(data.get("dataset") or {})}
    what = data.get("preset") or data.get("baseline") or preset.get("baseline") or "skf"
    return f"{what}-{dataset.get('name') or 'skf-demo'}"


def _retrain_run_name() -> str:
    from prefect.runtime import flow_run

    return f"retrain-{flow_run.parameters.get('dataset_name', 'dataset')}"


# Parameters are validated (and the training planned) by SkfTrainParams itself, once: Prefect's own
# validation would rebuild a given model from its dump and plan it a second time.
@flow(name="skf-train", validate_parameters=False, flow_run_name=_train_run_name)
def skf_train(params: SkfTrainParams) -> dict[str, Any]:
    """Ingest, precompute priors, train, evaluate and register one model; see the module docstring.

    Returns each stage's result (``preflight``, ``ingest``, ``priors``, ``train``, ``evaluate``,
    ``register``) and the summary markdown (also published as the ``skf-train-<dataset>`` artifact).
    """
    if not isinstance(params, SkfTrainParams):  # a deployment's JSON parameters
        params = SkfTrainParams.model_validate(params)
    from flows.ingest import ingest_dataset

    stages: dict[str, Any] = {}
    try:
        stages["preflight"] = check_services(params)
        source = prepare_source(params.dataset.source, params.dataset.demo)
        stages["ingest"] = ingest_dataset(source, params.dataset.name, params.dataset.layout)
        _train_evaluate_register(params, stages)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        _publish_summary(summary_markdown(params, stages, error), params.dataset.name, failed=True)
        raise
    markdown = _publish_summary(summary_markdown(params, stages), params.dataset.name)
    get_run_logger().info("skf-train summary\n%s", markdown)
    return {**stages, "summary": markdown}


@flow(name="skf-retrain", flow_run_name=_retrain_run_name)
def skf_retrain(
    data_prefix: str,
    dataset_name: str,
    layout: str = "auto",
    preset: str | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest ``data_prefix`` as ``dataset_name``; only when that makes a new version, train on it.

    ``preset``/``params`` configure the training exactly as for ``skf-train`` (the dataset fields are
    set from ``data_prefix``, ``dataset_name`` and ``layout``). The data is ingested once: the training
    stages run on the version this flow ingested. Unchanged data ends with "nothing new".
    """
    from flows.ingest import ingest_dataset

    full = resolve_params(
        {"preset": preset, **(params or {})},
        dataset={"source": data_prefix, "name": dataset_name, "layout": layout, "demo": False},
    )
    stages: dict[str, Any] = {"preflight": check_services(full)}
    stages["ingest"] = ingested = ingest_dataset(data_prefix, dataset_name, layout)
    key = _artifact_key("skf-retrain", dataset_name)
    if not ingested["created"]:
        create_markdown_artifact(
            markdown=f"# skf-retrain: nothing new\n\n`{data_prefix}` holds the same images as "
            f"`{ingested['ref']}`; no new version, no training.\n",
            key=key,
            description="skf-retrain summary",
        )
        get_run_logger().info("nothing new under %s (still %s)", data_prefix, ingested["ref"])
        return {"status": "nothing new", "dataset_version": ingested["ref"]}
    changes = ", ".join(f"{len(v)} {k}" for k, v in ingested["changes"].items() if v) or "first version"
    lead = f"New version `{ingested['ref']}` of `{data_prefix}` ({changes})"
    try:
        _train_evaluate_register(full, stages)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        markdown = summary_markdown(full, stages, error, flow="skf-retrain", lead=lead)
        _publish_summary(markdown, dataset_name, "skf-retrain", failed=True)
        raise
    markdown = summary_markdown(full, stages, flow="skf-retrain", lead=lead)
    _publish_summary(markdown, dataset_name, "skf-retrain")
    return {
        "status": "retrained",
        "dataset_version": ingested["ref"],
        "changes": ingested["changes"],
        **stages,
        "summary": markdown,
    }
