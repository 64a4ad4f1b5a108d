"""Parent flows: ``skf-train`` (ingest -> precompute-priors -> train -> evaluate -> register) and ``skf-retrain``.

Parameters are one typed model, :class:`SkfTrainParams`, usually a preset from ``configs/pipelines/`` with a
few fields overridden (``{"preset": "lol-v2", "dataset": {"source": "s3://..."}}``). Every check that can
fail without touching data -- component specs, layout, recipe and overrides, protocol, metric names -- runs
while the parameters are validated, so a bad request fails before any stage starts.

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

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_validator

from components.errors import SKFError
from components.recipes import deep_merge
from components.training.plan import OFF, TrainingPlan, TrainingRequest, plan

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs" / "pipelines"
DEMO_DIRNAME = "demo-data"


class PresetError(SKFError, ValueError):
    """A pipeline preset is missing or malformed."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of preset ``name`` (``configs/pipelines/<name>.yaml``) or of a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise PresetError(
            f"unknown pipeline preset {name_or_path!r}; available: {', '.join(available_presets())} "
            "(or a path to a .yaml file)"
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise PresetError(f"preset {path} must be a mapping at the top level")
    return data


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetParams(_Params):
    name: str = Field("skf-demo", description="Catalog dataset name (versions are name@N).")
    source: str | None = Field(None, description="Folder, archive or s3:// prefix to ingest.")
    layout: str = Field(
        "auto",
        description="auto, lol, lol-v2-real, lol-v2-synthetic or unpaired; append +pair-by-order to pair "
        "a paired layout by sort order instead of by name (recorded in the version).",
    )
    demo: bool = Field(
        False, description="Generate the demo dataset at source (default $SKF_HOME/demo-data)."
    )


def _request_fields(*names: str) -> dict[str, Any]:
    """Fields of :class:`TrainingRequest` (type, default, description, bounds), declared there only."""
    return {n: (TrainingRequest.model_fields[n].annotation, TrainingRequest.model_fields[n]) for n in names}


#: The SKB and SKF module specs of the request.
ComponentParams = create_model(
    "ComponentParams", __base__=_Params, **_request_fields("skb", "se", "sch", "sa")
)

#: How the request trains: the rest of :class:`TrainingRequest`, plus a failure drill.
TrainingParams = create_model(
    "TrainingParams",
    __base__=_Params,
    **_request_fields("recipe", "overrides", "skb_mode", "skb_checkpoint", "val_fraction", "device"),
    stop_after_step=(int | None, Field(None, gt=0, description="Fail on purpose after this step (drills).")),
)


class EvaluationParams(_Params):
    protocol: str = "raw"
    unpaired_refs: list[str] = Field(default_factory=list, description="Unpaired dataset versions (NIQE).")


class PromotionParams(_Params):
    primary_metric: str = "psnr"
    margin: float = Field(0.0, ge=0.0)
    guards: dict[str, float] = Field(
        default_factory=lambda: {"ssim": 0.005, "lpips": 0.005},
        description="Metric -> tolerated regression versus the champion.",
    )

    def policy(self) -> dict[str, Any]:
        """As :class:`components.model_registry.PromotionPolicy` data (directions from the metric table)."""
        from components.evaluation import get_metric

        return {
            "primary": self.primary_metric,
            "higher_is_better": get_metric(self.primary_metric).higher_is_better,
            "margin": self.margin,
            "guards": [
                {"metric": m, "higher_is_better": get_metric(m).higher_is_better, "tolerance": float(t)}
                for m, t in sorted(self.guards.items())
            ],
        }


class RegistryParams(_Params):
    model_name: str | None = Field(None, description="Registered model name (default skf-<dataset>).")
    promote: bool = True
    promotion: PromotionParams = Field(default_factory=PromotionParams)


class SkfTrainParams(_Params):
    """Everything ``skf-train`` needs. ``preset`` names a file in ``configs/pipelines``; the other fields
    given here are merged over it."""

    preset: str | None = None
    description: str = ""
    dataset: DatasetParams = Field(default_factory=DatasetParams)
    baseline: str | None = Field(
        TrainingRequest.model_fields["baseline"].default,
        description=TrainingRequest.model_fields["baseline"].description,
    )
    components: ComponentParams = Field(default_factory=ComponentParams)  # type: ignore[valid-type]
    training: TrainingParams = Field(default_factory=TrainingParams)  # type: ignore[valid-type]
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    precompute_batch_size: int = Field(4, gt=0)
    _plan: TrainingPlan | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("preset"):
            return deep_merge(load_preset(str(data["preset"])), data)
        return data

    @model_validator(mode="after")
    def _check(self) -> SkfTrainParams:
        from components.data.ingest import check_dataset_name, parse_ref
        from components.data.layouts import parse_layout
        from components.evaluation import get_metric, get_protocol

        parse_layout(self.dataset.layout)  # a LayoutError (a ValueError) names the choices
        if self.dataset.source is None and not self.dataset.demo:
            raise ValueError(
                "dataset.source is required (a folder, archive or s3:// prefix) unless dataset.demo"
            )
        check_dataset_name(self.dataset.name)
        get_protocol(self.evaluation.protocol)
        for ref in self.evaluation.unpaired_refs:
            parse_ref(ref)
        for metric in (self.registry.promotion.primary_metric, *self.registry.promotion.guards):
            get_metric(metric)
        self._plan = plan(self.request())  # component specs, recipe and overrides: planned once, here
        return self

    def request(self) -> TrainingRequest:
        """The training request these parameters make (the ``components`` and ``training`` groups)."""
        training = self.training.model_dump(exclude={"stop_after_step"})
        return TrainingRequest(baseline=self.baseline, **self.components.model_dump(), **training)

    def plan(self) -> TrainingPlan:
        """The plan made when these parameters were validated."""
        if self._plan is None:  # a copy made without validation
            self._plan = plan(self.request())
        return self._plan


def resolve_params(params: SkfTrainParams | Mapping[str, Any] | None = None, **fields: Any) -> SkfTrainParams:
    """Validated parameters from a model, a mapping (``preset`` + overrides) and/or keyword fields."""
    data = params.model_dump(exclude_unset=True) if isinstance(params, SkfTrainParams) else dict(params or {})
    return SkfTrainParams.model_validate(deep_merge(data, fields))


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


def _eval_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The paired test-split aggregates promotion compares (``test/psnr``, ...; counts left out)."""
    split = "test" if evaluation["protocol"] == "raw" else f"test-{evaluation['protocol']}"
    return {
        k: float(v)
        for k, v in evaluation["metrics"].items()
        if k.startswith(f"{split}/") and not k.endswith("/num_images")
    }


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
        metrics=_eval_metrics(evaluation),
        promote=False,
    )
    registered["status"] = "registered"
    if params.registry.promote:
        policy = params.registry.promotion.policy()
        decision = promote_version(registered["name"], registered["version"], policy)
        registered["decision"] = {"promoted": decision.promoted, "reason": decision.reason}
    return registered


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def _stage_lines(stages: Mapping[str, Any]) -> list[str]:
    """Ingest, priors and training, one line each."""
    lines: list[str] = []
    ing = stages.get("ingest")
    if ing:
        total = sum(n for roles in ing["counts"].values() for n in roles.values())
        lines += [
            "",
            f"**Ingest**: `{ing['ref']}` {'created' if ing['created'] else 'unchanged'} "
            f"({total} images, {len(ing['quarantined'])} quarantined)",
        ]
    pri = stages.get("priors")
    if pri:
        lines.append(
            f"**Priors** ({pri['skb_spec_resolved']}, fingerprint `{pri['fingerprint'][:12]}`): "
            f"{pri['computed']} computed, {pri['cached']} cached, {pri['failed']} failed, "
            f"{pri['forward_passes']} SKB forward passes"
        )
    elif "priors" in stages:
        lines.append("**Priors**: not cached (the recipe runs the SKB online or uses none)")
    tr = stages.get("train")
    if tr:
        lines.append(
            f"**Training**: {tr['status']}, {tr['steps']} steps, run `{tr['run_id']}`, "
            f"config `{tr['config_hash'][:12]}`, checkpoint `{tr['checkpoint_uri']}`"
        )
    return lines


def _result_lines(stages: Mapping[str, Any]) -> list[str]:
    """The evaluation table and the registration with its promotion decision."""
    lines: list[str] = []
    ev = stages.get("evaluate")
    if ev:
        lines += ["", f"**Evaluation** ({ev['status']}, protocol `{ev['protocol']}`):", ""]
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(ev["metrics"].items())]
        lines += [f"| {k} | unavailable |" for k in sorted(ev["unavailable"])]
        lines += ["", f"Crops: {ev['grid_uri']}  ", f"Per-image CSV: {ev['csv_uri']}"]
    reg = stages.get("register")
    if reg:
        lines += [
            "",
            f"**Registry**: `{reg['name']}` version {reg['version']} ({reg.get('status', 'registered')}), "
            f"{'challenger' if reg['challenger'] else 'not challenger (a newer version holds the alias)'}",
        ]
        decision = reg.get("decision")
        if decision:
            verdict = "promoted to champion" if decision["promoted"] else "not promoted"
            lines.append(f"**Promotion**: {verdict}: {decision['reason']}")
        lines += [
            "",
            f"- challenger: `models:/{reg['name']}@challenger`",
            f"- champion: `models:/{reg['name']}@champion`",
        ]
    return lines


def summary_markdown(params: SkfTrainParams, stages: Mapping[str, Any], error: str | None = None) -> str:
    """What one ``skf-train`` run did: per-stage outcome, metrics, promotion decision and where to look."""
    from components.settings import get_settings

    lines = [
        f"# skf-train: {'failed' if error else 'done'}",
        "",
        f"Preset `{params.preset or '-'}`; {params.description}".rstrip("; "),
        *_stage_lines(stages),
        *_result_lines(stages),
        "",
        f"MLflow UI: `mlflow ui --backend-store-uri {get_settings().mlflow_tracking_uri}`",
    ]
    if error:
        lines += ["", f"**Failed**: {error}", "", "Rerun with the same parameters to resume from this point."]
    return "\n".join(lines) + "\n"


def _artifact_key(prefix: str, name: str) -> str:
    return f"{prefix}-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset")


def _publish_summary(params: SkfTrainParams, stages: Mapping[str, Any], error: str | None = None) -> str:
    markdown = summary_markdown(params, stages, error)
    create_markdown_artifact(
        markdown=markdown,
        key=_artifact_key("skf-train", params.dataset.name),
        description="skf-train summary" + (" (failed)" if error else ""),
    )
    return markdown


# --------------------------------------------------------------------------------------------------
# Flows
# --------------------------------------------------------------------------------------------------
# Parameters are validated (and the training planned) by SkfTrainParams itself, once: Prefect's own
# validation would rebuild a given model from its dump and plan it a second time.
@flow(name="skf-train", validate_parameters=False)
def skf_train(params: SkfTrainParams) -> dict[str, Any]:
    """Ingest, precompute priors, train, evaluate and register one model; see the module docstring.

    Returns each stage's result (``ingest``, ``priors``, ``train``, ``evaluate``, ``register``) and
    the summary markdown (also published as the ``skf-train-<dataset>`` artifact).
    """
    if not isinstance(params, SkfTrainParams):  # a deployment's JSON parameters
        params = SkfTrainParams.model_validate(params)
    from flows.evaluate import evaluate_model
    from flows.ingest import ingest_dataset
    from flows.precompute import precompute_priors_flow
    from flows.train import train_model

    training_plan = params.plan()  # made once, when the parameters were validated
    stages: dict[str, Any] = {}
    try:
        source = prepare_source(params.dataset.source, params.dataset.demo)
        stages["ingest"] = ingest_dataset(source, params.dataset.name, params.dataset.layout)
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
    except BaseException as exc:
        _publish_summary(params, stages, error=f"{type(exc).__name__}: {exc}")
        raise
    markdown = _publish_summary(params, stages)
    get_run_logger().info("skf-train summary\n%s", markdown)
    return {**stages, "summary": markdown}


@flow(name="skf-retrain")
def skf_retrain(
    data_prefix: str,
    dataset_name: str,
    layout: str = "auto",
    preset: str | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest ``data_prefix`` as ``dataset_name``; only when that makes a new version, run ``skf-train``.

    ``preset``/``params`` configure the training exactly as for ``skf-train`` (the dataset fields are
    set from ``data_prefix``, ``dataset_name`` and ``layout``). Unchanged data ends with "nothing new".
    """
    from flows.ingest import ingest_dataset

    full = resolve_params(
        {"preset": preset, **(params or {})},
        dataset={"source": data_prefix, "name": dataset_name, "layout": layout, "demo": False},
    )
    ingested = ingest_dataset(data_prefix, dataset_name, layout)
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
    result = skf_train(full)
    create_markdown_artifact(
        markdown=f"# skf-retrain: new version `{ingested['ref']}` ({changes})\n\n" + result["summary"],
        key=key,
        description="skf-retrain summary",
    )
    return {
        "status": "retrained",
        "dataset_version": ingested["ref"],
        "changes": ingested["changes"],
        **result,
    }


__all__ = [
    "OFF",
    "ComponentParams",
    "DatasetParams",
    "EvaluationParams",
    "PresetError",
    "PromotionParams",
    "RegistryParams",
    "SkfTrainParams",
    "TrainingParams",
    "available_presets",
    "load_preset",
    "resolve_params",
    "skf_retrain",
    "skf_train",
]
