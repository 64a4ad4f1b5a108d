"""``skf-train``'s parameters: presets from ``configs/pipelines/`` and the typed model :class:`SkfTrainParams`.

A preset says where a run happens (data, HRNet checkpoint, validation split, evaluation, registry) and names
the recipe that says what is trained. Validating the parameters plans the training once, so a bad request
fails before any stage starts. Prefect-free: the flows in :mod:`flows.pipeline` only receive these.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_validator

from components.errors import SKFError
from components.recipes import deep_merge
from components.training.plan import TrainingPlan, TrainingRequest, plan

__all__ = [
    "DEMO_DIRNAME",
    "PRESETS_DIR",
    "PresetError",
    "SkfTrainParams",
    "available_presets",
    "eval_metrics",
    "load_preset",
    "resolve_params",
]

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "pipelines"
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
    **_request_fields(
        "recipe",
        "overrides",
        "skb_mode",
        "skb_checkpoint",
        "val_fraction",
        "device",
        "gpus",
        "nodes",
        "num_workers",
        "compile",
    ),
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


def eval_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The paired test-split aggregates promotion compares (``test/psnr``, ...; counts left out)."""
    split = "test" if evaluation["protocol"] == "raw" else f"test-{evaluation['protocol']}"
    return {
        k: float(v)
        for k, v in evaluation["metrics"].items()
        if k.startswith(f"{split}/") and not k.endswith("/num_images")
    }
