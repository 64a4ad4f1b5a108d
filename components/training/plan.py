"""Planning a training: what a user may ask (:class:`TrainingRequest`) -> what will run (:class:`TrainingPlan`).

:func:`plan` runs once per request -- in the ``skf-train`` flow's parameters, in the ``train-model`` flow when
it is given a request, or in ``skf train`` -- and checks everything that needs no data or weights: the
component specs, the recipe and its overrides, and whether the SKF modules fit the baseline. The plan is
JSON-able (``plan.model_dump(mode="json")`` and ``TrainingPlan.model_validate`` round-trip it), so the
Prefect task and the training job receive the plan itself, never the request to plan again.

    request = TrainingRequest(baseline="baseline/drbn@1", sch="off", overrides={"train.iterations": 1000})
    training_plan = plan(request)       # or plan(baseline="baseline/drbn@1", sch="off", ...)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components import registry
from components.baselines import BaselineFamily, families, get_family
from components.errors import UserInputError
from components.precompute import DEFAULT_SKB
from components.recipes import Recipe, load_recipe
from components.training.engine import CompileMode
from components.training.routines import SA_SPEC, SCH_SPEC, check_model_overrides

__all__ = [
    "DEFAULT_BASELINE",
    "DEFAULT_SKB",
    "DEFAULT_VAL_FRACTION",
    "OFF",
    "TrainingPlan",
    "TrainingRequest",
    "plan",
]

OFF = "off"
DEFAULT_BASELINE = "baseline/snr-net@1"
DEFAULT_VAL_FRACTION = 0.1


class TrainingRequest(BaseModel):
    """Everything a user may ask of one training; the single declaration of these knobs.

    The ``skf train`` options and the ``skf-train`` flow's ``components``/``training`` parameters are made
    from these fields. SKF modules are registry specs: ``"off"`` disables one, ``None`` keeps the recipe's
    choice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    baseline: str | None = Field(
        None, description=f"Baseline spec (default: the recipe's, else {DEFAULT_BASELINE}; `skf components`)."
    )
    recipe: str | None = Field(None, description="Recipe name or YAML path (default: <baseline>-skf).")
    skb: str | None = Field(
        None, description="SKB spec, or 'off' for the plain baseline (default: the recipe's skf.skb)."
    )
    se: str | None = Field(None, description="SE spec or 'off' (default: as the recipe says).")
    sch: str | None = Field(None, description="SCH loss spec or 'off' (default: as the recipe says).")
    sa: str | None = Field(
        None, description="SA loss spec or 'off' (baselines that define SA; default: as the recipe says)."
    )
    skb_mode: str | None = Field(None, description="cached or online (default: the recipe's).")
    skb_checkpoint: str | None = Field(None, description="HRNet checkpoint path/URI (default: random init).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Recipe overrides (dotted keys ok), e.g. train.iterations."
    )
    val_fraction: float = Field(
        DEFAULT_VAL_FRACTION, ge=0.0, lt=1.0, description="Fraction of train pairs carved out for validation."
    )
    device: str | None = Field(None, description="torch device (default: cuda if available, else cpu).")
    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes the training launches on its host with torchrun, one per GPU (DDP; the "
        "recipe's batch is per process). 1 trains in the calling process.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Machines the training spans: more than 1 submits a Kubeflow PyTorchJob of that many pods "
        "with `gpus` processes each (infra/k8s/pytorchjob.yaml). 1 trains on the calling host.",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="DataLoader worker processes per training process (default: none on CPU; on CUDA the "
        "host's CPUs per process minus one, at most 8); like device, how the run executes, not what it "
        "trains (augmentation is seeded per sample).",
    )
    compile: CompileMode = Field(
        "off",
        description="torch.compile mode for the trained networks (off, default, reduce-overhead, "
        "max-autotune); like device, how the run executes, not what it trains.",
    )


class TrainingPlan(BaseModel):
    """A validated request: the effective recipe, the resolved component specs and how to run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: TrainingRequest  # what was asked, as given
    recipe: Recipe
    baseline: str  # resolved baseline spec
    skb: str | None  # resolved SKB spec; None when the recipe uses no SKF module
    skb_checkpoint: str | None

    @property
    def val_fraction(self) -> float:
        return self.request.val_fraction

    @property
    def device(self) -> str | None:
        return self.request.device

    @property
    def gpus(self) -> int:
        return self.request.gpus

    @property
    def nodes(self) -> int:
        return self.request.nodes

    @property
    def world_size(self) -> int:
        """Training processes in all: the recipe's batch is per process."""
        return self.request.gpus * self.request.nodes

    @property
    def num_workers(self) -> int | None:
        return self.request.num_workers

    @property
    def compile(self) -> str:
        return self.request.compile

    def describe(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "baseline": self.baseline,
            "skb": self.skb or OFF,
            "skb_mode": self.recipe.skf.skb_mode if self.skb else OFF,
            "se": self.recipe.skf.se,
            "sch": self.recipe.skf.sch.enabled,
            "sa": self.recipe.skf.sa.enabled,
            "iterations": self.recipe.train.iterations,
        }


def _switch_overrides(family: BaselineFamily, request: TrainingRequest) -> dict[str, Any]:
    """Recipe overrides for the requested SE/SCH/SA specs.

    SE may be any registered variant that builds into the family's SE slots (checked here, before any
    work; a non-default one is recorded as ``model.se``); SCH and SA must be the registered losses, and SA
    only where the family defines it.
    """
    out: dict[str, Any] = {}
    for field, expected, key in (
        ("se", family.default_se, "skf.se"),
        ("sch", SCH_SPEC, "skf.sch.enabled"),
        ("sa", SA_SPEC, "skf.sa.enabled"),
    ):
        value = getattr(request, field)
        if request.skb == OFF and value is None:
            value = OFF  # no SKB: nothing semantic can run
        if value is None:
            continue
        if value == OFF:
            out[key] = False
            continue
        if request.skb == OFF:
            raise UserInputError(
                f"{field}={value!r} needs semantic priors, but skb is 'off'; name an SKB spec"
            )
        got, want = registry.resolved_spec(value), registry.resolved_spec(expected)
        if field == "se" and got != want:
            family.check_se(got)
            out["model.se"] = got
        elif got != want:
            raise UserInputError(
                f"{field}={got} does not fit baseline/{family.name}: it takes {want} (use {want!r} or 'off')"
            )
        out[key] = True
    return out


def _request(
    request: TrainingRequest | Mapping[str, Any] | None, fields: Mapping[str, Any]
) -> TrainingRequest:
    if isinstance(request, TrainingRequest) and not fields:
        return request
    data = request.model_dump() if isinstance(request, TrainingRequest) else dict(request or {})
    try:
        return TrainingRequest.model_validate({**data, **fields})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
        )
        raise UserInputError(f"invalid training request: {problems}") from None


def plan(request: TrainingRequest | Mapping[str, Any] | None = None, /, **fields: Any) -> TrainingPlan:
    """Validate a training request without touching data or weights.

    ``request`` is a :class:`TrainingRequest` or its fields as a mapping; keyword ``fields`` are merged
    over it. ``recipe`` defaults to ``<baseline>-skf`` (or the plain ``<baseline>`` recipe when every SKF
    module is off); ``skb_mode`` ``None`` keeps the recipe's mode. Unknown specs raise
    :class:`~components.registry.UnknownComponentError`, bad recipes/overrides
    :class:`~components.recipes.RecipeError`, inconsistent choices and bad fields
    :class:`~components.errors.UserInputError`.
    """
    req = _request(request, fields)
    chosen = load_recipe(req.recipe) if req.recipe else None  # the recipe says what is trained
    req = req.model_copy(
        update={
            "baseline": req.baseline or (chosen.baseline if chosen else DEFAULT_BASELINE),
            "skb": req.skb or (chosen.skf.skb if chosen else DEFAULT_SKB),
        }
    )
    baseline_spec = registry.resolved_spec(req.baseline)
    if not baseline_spec.startswith("baseline/"):
        raise UserInputError(f"baseline must be a 'baseline/...' spec, got {req.baseline!r}")
    family = get_family(baseline_spec)
    if req.skb != OFF and not registry.resolved_spec(req.skb).startswith("skb/"):
        raise UserInputError(f"skb must be an 'skb/...' spec or 'off', got {req.skb!r}")
    if req.sa not in (None, OFF) and not family.supports_sa:
        defined = ", ".join(f"{f.name.upper()}-SKF" for f in families() if f.supports_sa) or "no baseline"
        raise UserInputError(
            f"sa={req.sa!r}: the SA loss is not defined for {baseline_spec} (only defined for {defined}); "
            "use sa='off'"
        )
    switch = _switch_overrides(family, req)
    all_off = req.skb == OFF or all(getattr(req, f) == OFF for f in ("se", "sch", "sa"))
    name = req.recipe or (family.name if all_off else f"{family.name}-skf")
    merged: dict[str, Any] = {**req.overrides, **switch}
    if req.skb_mode is not None:
        merged["skf.skb_mode"] = req.skb_mode
    if req.skb != OFF:
        merged["skf.skb"] = registry.resolved_spec(req.skb)  # the recipe records the SKB it trains with
    loaded = load_recipe(name, merged)
    if get_family(registry.resolved_spec(loaded.baseline)).name != family.name:
        raise UserInputError(
            f"recipe {loaded.name!r} trains {loaded.baseline}, not {baseline_spec}: "
            f"choose a {family.name} recipe (e.g. {family.name!r} or '{family.name}-skf')"
        )
    loaded = loaded.model_copy(update={"baseline": baseline_spec})
    check_model_overrides(baseline_spec, loaded.model)
    family.check_stages(loaded)  # unknown stage, sub-network or loss term: refused before any work
    uses_skb = loaded.skf.enabled
    return TrainingPlan(
        request=req,
        recipe=loaded,
        baseline=baseline_spec,
        skb=registry.resolved_spec(req.skb) if uses_skb else None,
        skb_checkpoint=req.skb_checkpoint if uses_skb else None,
    )
