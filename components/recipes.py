"""Typed training recipes: one YAML file per baseline (+SKF variant) under ``configs/recipes/``.

A recipe names the network (a ``baseline/*`` registry spec plus builder overrides) and everything the
training engine needs: optimiser, LR schedule, run length/batch/crop/seed/precision, reconstruction
losses and the SKF switches (SE, SCH, SA, how and on what the SKB runs). Defaults of the shipped files are
the official ones of docs/method.md §7. Unknown keys are rejected everywhere, so a typo fails loudly.

A recipe file may start with ``extends: <name>`` to inherit another recipe and override parts of it
(mappings merge recursively, everything else is replaced).

    recipe = load_recipe("drbn-skf", {"train.iterations": 1000, "optimizer": {"lr": 2e-4}})
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.baseline_losses import BASELINE_LOSSES
from components.errors import SKFError
from components.losses import SAPrecision
from components.skb import SKB_SETTINGS

__all__ = [
    "RECIPES_DIR",
    "AugmentConfig",
    "LossTerm",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "SAConfig",
    "SCHConfig",
    "SKFConfig",
    "SchedulerConfig",
    "TrainConfig",
    "available_recipes",
    "deep_merge",
    "load_recipe",
]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs" / "recipes"


class RecipeError(SKFError, ValueError):
    """A recipe could not be found, parsed or validated; the message names the file and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {v}")
        return v


class SchedulerConfig(_Strict):
    """LR schedule, stepped once per iteration: ``multistep`` at ``milestones``, ``step`` every
    ``step_size`` iterations, ``cosine`` (annealed to ``min_factor`` of the base rate over the run after the
    warm-up) or ``constant``; optional linear warm-up over ``warmup`` iterations."""

    name: Literal["multistep", "step", "cosine", "constant"] = "constant"
    milestones: list[int] | None = None
    step_size: int | None = Field(None, gt=0)
    gamma: float = Field(0.5, gt=0, le=1)
    warmup: int = Field(0, ge=0)
    min_factor: float = Field(0.0, ge=0, le=1, description="cosine: the final rate as a fraction of the base")

    @model_validator(mode="after")
    def _fields_match_name(self) -> SchedulerConfig:
        if self.name == "multistep":
            if not self.milestones:
                raise ValueError("scheduler 'multistep' needs milestones (iterations), e.g. [50000, 100000]")
            if sorted(self.milestones) != self.milestones or self.milestones[0] <= 0:
                raise ValueError(f"milestones must be positive and increasing, got {self.milestones}")
        elif self.milestones is not None:
            raise ValueError(f"milestones only apply to scheduler 'multistep', not {self.name!r}")
        if self.name == "step" and self.step_size is None:
            raise ValueError("scheduler 'step' needs step_size (iterations)")
        if self.name != "step" and self.step_size is not None:
            raise ValueError(f"step_size only applies to scheduler 'step', not {self.name!r}")
        return self


class AugmentConfig(_Strict):
    """Paired augmentations applied after the random crop, each with probability 0.5."""

    hflip: bool = True
    vflip: bool = True
    transpose: bool = False


class TrainConfig(_Strict):
    iterations: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    crop: int = Field(gt=0, description="square training crop size in pixels")
    seed: int = 0
    precision: Literal["fp32", "amp"] = "fp32"
    grad_clip: float | None = Field(None, gt=0)
    val_every: int = Field(gt=0)
    ckpt_every: int = Field(gt=0)
    augment: AugmentConfig = AugmentConfig()
    init_checkpoint: str | None = Field(None, description="weights to start from (path/URI), non-strict")


class LossTerm(_Strict):
    weight: float = Field(1.0, ge=0)
    every: int = Field(1, gt=0, description="apply on iterations where step % every == 0")
    params: dict[str, Any] = Field(default_factory=dict)


class StageConfig(_Strict):
    """One stage of a multi-stage recipe (Retinex-style baselines train sub-networks in sequence).

    ``modules`` are the family's sub-networks trained in this stage (the others are frozen); ``losses``
    the stage's terms, named as the family's stage declares them. Only the final stage trains with the
    semantic losses (the paper's rule): ``sch``/``sa`` default to the recipe's ``skf`` switches on the
    final stage and off elsewhere; asking for them on another stage is an error.
    """

    name: str = Field(min_length=1)
    modules: list[str] = Field(min_length=1)
    iterations: int = Field(gt=0, description="optimisation steps of this stage")
    losses: dict[str, LossTerm] = Field(min_length=1)
    optimizer: OptimizerConfig | None = Field(None, description="default: the recipe's optimizer")
    scheduler: SchedulerConfig | None = Field(None, description="default: constant learning rate")
    batch_size: int | None = Field(None, gt=0, description="default: train.batch_size")
    crop: int | None = Field(None, gt=0, description="default: train.crop")
    sch: bool | None = None
    sa: bool | None = None


class SCHConfig(_Strict):
    """Semantic-guided colour-histogram loss (docs/method.md §4)."""

    enabled: bool = False
    weight: float = Field(1.0, ge=0)
    normalizer: Literal["nhw", "nchw3"] = Field("nhw", description="N·H·W (SNR/LLFlow) or N·59·H·W·3 (DRBN)")
    every: int = Field(1, gt=0)


class SAConfig(_Strict):
    """Semantic-guided adversarial loss (docs/method.md §5)."""

    enabled: bool = False
    weight: float = Field(0.1, ge=0)
    lam: float = Field(0.9, ge=0, le=1, description="λ between global and local D terms")
    d_lr_ratio: float = Field(1e-3, gt=0, description="discriminator lr = generator lr × this")
    official_compat: bool = Field(False, description="reproduce the released mask aliasing / untrained conv0")
    precision: SAPrecision = Field(
        "auto",
        description="the discriminator step's passes: 'auto' = bf16 autocast where the device has native "
        "bf16 (AVX512-BF16/AMX CPU, sm80+ GPU) unless official_compat, else fp32; parameters, losses and the "
        "generator's adversarial pass stay fp32",
    )


class SKFConfig(_Strict):
    skb: str = Field("skb/hrnet-w48-pascal@1", description="SKB spec the SKF modules take their priors from")
    se: bool = False
    sch: SCHConfig = SCHConfig()
    sa: SAConfig = SAConfig()
    skb_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="SKB builder options that change its priors: bn_mode (eval|train), input_transform "
        "(linear|log|imagenet), pad_multiple, amp; recorded in the SKB fingerprint",
    )
    skb_mode: Literal["cached", "online"] = "cached"
    skb_input: Literal["lq", "gt", "intermediate"] = "lq"
    two_pass_test: bool = Field(False, description="SNR test: re-segment the first output and enhance again")

    @property
    def enabled(self) -> bool:
        return self.se or self.sch.enabled or self.sa.enabled

    @model_validator(mode="after")
    def _consistent(self) -> SKFConfig:
        unknown = sorted(set(self.skb_settings) - set(SKB_SETTINGS))
        if unknown:
            raise ValueError(f"skb_settings {unknown} are not SKB options; known: {', '.join(SKB_SETTINGS)}")
        if self.skb_settings.get("bn_mode", "eval") == "train" and self.skb_mode == "cached":
            raise ValueError(
                "skb_settings.bn_mode 'train' makes the priors depend on the batch (LLFlow-SKF as released), "
                "so they cannot be cached: set skf.skb_mode to 'online' (or bn_mode to 'eval')"
            )
        if self.skb_input == "intermediate" and self.skb_mode != "online":
            raise ValueError(
                "skb_input 'intermediate' (DRBN segments its own recurrence-3 output) needs skb_mode 'online'; "
                "cached priors can only come from a fixed image ('lq' or 'gt')"
            )
        if self.two_pass_test and self.skb_input == "intermediate":
            raise ValueError(
                "two_pass_test re-segments the output of a full pass; it does not combine with 'intermediate'"
            )
        return self


class Recipe(_Strict):
    name: str
    description: str = ""
    baseline: str = Field(description="registry spec of the network, e.g. 'baseline/drbn@1'")
    model: dict[str, Any] = Field(default_factory=dict, description="builder overrides")
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig
    losses: dict[str, LossTerm] = Field(default_factory=dict)
    skf: SKFConfig = SKFConfig()
    stages: list[StageConfig] = Field(
        default_factory=list, description="sub-networks trained in sequence (empty: one stage, `losses`)"
    )

    @field_validator("baseline")
    @classmethod
    def _baseline_spec(cls, v: str) -> str:
        if not v.startswith("baseline/"):
            raise ValueError(f"baseline must be a 'baseline/<name>[@version]' spec, got {v!r}")
        return v

    @field_validator("model")
    @classmethod
    def _no_skf_in_model(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "skf" in v or "seg" in v:
            raise ValueError("set SE blocks with 'skf.se', not in 'model'")
        return v

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: dict[str, LossTerm]) -> dict[str, LossTerm]:
        unknown = sorted(set(v) - set(BASELINE_LOSSES))
        if unknown:
            raise ValueError(f"unknown loss(es) {unknown}; available: {sorted(BASELINE_LOSSES)}")
        return v

    @model_validator(mode="after")
    def _losses_or_stages(self) -> Recipe:
        if not self.stages:
            if not self.losses:
                raise ValueError("at least one reconstruction loss is required")
            return self
        if self.losses:
            raise ValueError("a staged recipe names its losses per stage (stages[].losses), not in `losses`")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for stage in self.stages[:-1]:
            for module, on in (("sch", stage.sch), ("sa", stage.sa)):
                if on:
                    raise ValueError(
                        f"stage {stage.name!r} asks for {module.upper()}, but only the final stage "
                        f"({self.stages[-1].name!r}) trains with the semantic losses; remove stages[].{module}"
                    )
        total = sum(s.iterations for s in self.stages)
        if self.train.iterations != total:
            raise ValueError(
                f"train.iterations ({self.train.iterations}) must equal the sum of the stages' iterations "
                f"({total}: {', '.join(f'{s.name} {s.iterations}' for s in self.stages)})"
            )
        return self

    def stage_semantics(self, stage: StageConfig) -> tuple[bool, bool]:
        """Whether ``stage`` trains with SCH and SA: the recipe's switches, on the final stage only."""
        final = stage.name == self.stages[-1].name
        sch = self.skf.sch.enabled if stage.sch is None else stage.sch
        sa = self.skf.sa.enabled if stage.sa is None else stage.sa
        return sch and final, sa and final

    @model_validator(mode="after")
    def _schedule_fits(self) -> Recipe:
        for stage in self.stages:
            sched = stage.scheduler
            if sched is not None and (
                (sched.milestones and sched.milestones[-1] >= stage.iterations)
                or sched.warmup >= stage.iterations
            ):
                raise ValueError(
                    f"stage {stage.name!r}: its schedule does not fit its {stage.iterations} iterations"
                )
        if self.stages:
            return self
        last = self.scheduler.milestones[-1] if self.scheduler.milestones else 0
        if last >= self.train.iterations:
            raise ValueError(
                f"the last milestone ({last}) is not before train.iterations ({self.train.iterations})"
            )
        if self.scheduler.warmup >= self.train.iterations:
            raise ValueError("scheduler.warmup must be shorter than train.iterations")
        return self

    def builder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the baseline builder (``skf`` switches the SE blocks)."""
        return {"skf": self.skf.se, **self.model}

    def build_model(self) -> Any:
        """Instantiate the network through the component registry."""
        from components.registry import create

        return create(self.baseline, **self.builder_kwargs())


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``configs/recipes``."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise RecipeError(
            f"unknown recipe {str(name_or_path)!r}; available: {', '.join(available_recipes()) or '(none)'} "
            f"(or pass a path to a .yaml file)"
        )
    return candidate


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; nested mappings merge, everything else is replaced (both copied)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _expand_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.iterations": 5}`` → ``{"train": {"iterations": 5}}`` (plain keys pass through)."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key!r} conflicts with another override of {part!r}")
        leaf = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return out


def _read(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in chain:
        raise RecipeError(
            f"recipe {path} extends itself (cycle: {' -> '.join(p.name for p in (*chain, path))})"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping at the top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent = str(parent)
    parent_path = path.parent / (parent if Path(parent).suffix in (".yaml", ".yml") else f"{parent}.yaml")
    if not parent_path.is_file():
        raise RecipeError(f"recipe {path} extends {parent!r}, but {parent_path} does not exist")
    return deep_merge(_read(parent_path, (*chain, path)), data)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = (
            "unknown key (not part of the recipe schema)" if err["type"] == "extra_forbidden" else err["msg"]
        )
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _override_stages(stages: list[Any], overrides: Mapping[str, Any]) -> list[Any]:
    """Apply ``stages.<name>.<field>[.<field>...]`` overrides to the stage of that name."""
    out = copy.deepcopy(stages)
    by_name = {s.get("name"): s for s in out if isinstance(s, dict)}
    for key, value in overrides.items():
        _, name, *rest = key.split(".")
        if name not in by_name or not rest:
            known = ", ".join(str(n) for n in by_name) or "none"
            raise RecipeError(
                f"override {key!r}: no stage {name!r} to set (stages: {known}); use stages.<name>.<field>"
            )
        by_name[name].update(deep_merge(by_name[name], _expand_dotted({".".join(rest): value})))
    return out


def scale_stages(stages: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """Stage dicts rescaled to ``total`` iterations, keeping their proportions (and their schedules').

    What ``--set train.iterations=N`` means for a staged recipe: the same stages, shorter or longer. Each
    stage keeps at least one step; milestones and warm-ups scale alike (a milestone that no longer falls
    inside its stage is dropped).
    """
    if total < len(stages):
        raise RecipeError(
            f"train.iterations={total} cannot hold {len(stages)} stages of at least one step each"
        )
    old = [int(s.get("iterations", 0)) for s in stages]
    factor = total / max(sum(old), 1)
    raw = [max(1.0, n * factor) for n in old]
    new = [max(1, int(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - new[i], reverse=True):  # largest remainders
        if sum(new) >= total:
            break
        new[i] += 1
    while sum(new) > total:  # every stage was lifted to one step
        new[new.index(max(new))] -= 1
    out = []
    for stage, n, before in zip(stages, new, old, strict=True):
        stage = copy.deepcopy(stage)
        stage["iterations"] = n
        sched = stage.get("scheduler")
        if isinstance(sched, dict) and before:
            ratio = n / before
            if sched.get("milestones"):
                kept = sorted({max(1, round(m * ratio)) for m in sched["milestones"]} - {0})
                kept = [m for m in kept if m < n]
                sched["milestones"] = kept or None
                if not kept:
                    sched["name"] = "constant"
            if sched.get("warmup"):
                sched["warmup"] = min(n - 1, round(sched["warmup"] * ratio))
        out.append(stage)
    return out


def load_recipe(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load, merge and validate a recipe.

    ``name_or_path``: a shipped recipe name (``drbn``, ``drbn-skf``, ``snr-net``, ``snr-net-skf``) or a
    YAML path. ``overrides``: nested mappings and/or dotted keys (``{"train.seed": 7}``) merged on top.
    Raises :class:`RecipeError` listing every invalid field.
    """
    path = _resolve(name_or_path)
    data = _read(path)
    if overrides:
        by_stage = {k: v for k, v in overrides.items() if k.startswith("stages.")}
        expanded = _expand_dotted({k: v for k, v in overrides.items() if k not in by_stage})
        data = deep_merge(data, expanded)
        if by_stage:
            data["stages"] = _override_stages(data.get("stages") or [], by_stage)
        train = expanded.get("train")
        total = train.get("iterations") if isinstance(train, Mapping) else None
        if data.get("stages") and isinstance(total, int) and not isinstance(total, bool):
            data["stages"] = scale_stages(data["stages"], total)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(
            f"invalid recipe {path}{' (with overrides)' if overrides else ''}:\n{_format_errors(exc)}\n"
            f"  fix the value(s) named above (--set KEY=VALUE or the recipe file; schema: {RECIPES_DIR})"
        ) from exc
