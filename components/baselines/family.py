"""What a baseline *is*, in one object: :class:`BaselineFamily`, one per family, registered once.

A family owns everything that differs between baselines, so that nothing else in the pipeline dispatches on
the network's type: how the network is built (and with which SE variant), where its SE blocks sit and which
priors feed them, its test-time flow, its training step, whether the SA loss applies, its SCH preset and its
released checkpoints' key conventions. :func:`components.training.routines.build_routine`,
:class:`components.inference.Enhancer`, planning and the recipes all ask the family.

Adding a baseline is a network in ``models/``, a family module that calls :func:`register_family`, and its
recipes.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from components.errors import UserInputError
from components.registry import create, register, resolved_spec
from models.se import SEFactory

__all__ = [
    "BaselineFamily",
    "PriorsFor",
    "SESlot",
    "StageSpec",
    "UnknownFamilyError",
    "families",
    "get_family",
    "register_family",
]

#: ``(stage, image) -> Priors``: the caller decides where priors come from (SKB online, cache, a fixed
#: image); the family decides when it needs them. Stages: ``"input"`` (the low-light image),
#: ``"intermediate"`` (DRBN's recurrence-3 estimate), ``"output"`` (a first pass, for two-pass flows).
PriorsFor = Callable[[str, Tensor], Any]


class SESlot(NamedTuple):
    """One SE block of a network: its module path and the SKB output that feeds it."""

    path: str
    prior: str  # "F0", "F1", "F2" (features at 1/4, 1/8, 1/16) or "Z" (class logits)


class StageSpec(NamedTuple):
    """A training stage a multi-stage family knows: the sub-networks it may train and its loss terms."""

    name: str
    modules: tuple[str, ...]
    losses: tuple[str, ...]


class UnknownFamilyError(UserInputError, KeyError):
    """No baseline family by that name or spec."""


class BaselineFamily:
    """The base class of every family; subclasses set the class attributes and the two flow methods."""

    name: ClassVar[str]  # "drbn": the one spelling of the family everywhere
    version: ClassVar[int] = 1
    description: ClassVar[str]
    network: ClassVar[type[nn.Module]]
    default_se: ClassVar[str]  # the SE variant of the released SKF model
    se_defaults: ClassVar[dict[str, Any]] = {}  # builder kwargs of default_se as released
    se_slots: ClassVar[tuple[SESlot, ...]]
    supports_sa: ClassVar[bool] = False
    supports_two_pass: ClassVar[bool] = False
    sch_preset: ClassVar[str]  # the loss/sch@1 preset of the released recipe
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ("module.",)  # stripped from released checkpoints
    routine: ClassVar[type]  # the per-baseline training step (a components.training.routines.BaselineRoutine)
    #: ``model.*`` sizes of the smallest sensible network of the family: the registry sweep tests, the
    #: CPU demo and the learning benchmark use it so every family is exercised the same cheap way.
    smoke_model: ClassVar[dict[str, Any]] = {}
    #: recipe overrides (dotted keys) without which ``smoke_model`` does not learn at a CPU budget; the
    #: learning benchmark and its test apply them (the released recipes stay as released)
    smoke_recipe: ClassVar[dict[str, Any]] = {}
    #: multi-stage families in the learning benchmark: each stage's steps as a multiple of the budget's.
    #: The final stage (the image) trains the budget's steps, as a one-stage family's network does; the
    #: sub-networks it stands on (decomposition, adjustment) are trained before it, in addition.
    smoke_stage_steps: ClassVar[dict[str, float]] = {}
    #: multi-stage families (Retinex-style): the stages a recipe may list, in training order; the last one
    #: holds the SE blocks and is the only one trained with SCH/SA. Empty: one stage, the recipe's ``losses``.
    stages: ClassVar[tuple[StageSpec, ...]] = ()
    #: SKB settings of the released *test* (``components.released``): what reproduces the released numbers
    released_skb_settings: ClassVar[dict[str, Any]] = {}
    #: evaluation protocols reported next to the requested one (LLFlow: ``gt-mean``, as its paper rows)
    side_protocols: ClassVar[tuple[str, ...]] = ()

    @property
    def spec(self) -> str:
        return f"baseline/{self.name}@{self.version}"

    # building ------------------------------------------------------------------------------------
    def se_factory(self, se: str | None = None, se_kwargs: Mapping[str, Any] | None = None) -> SEFactory:
        """Build each SE block from the registered ``se`` spec (default: the released variant)."""
        spec = resolved_spec(se or self.default_se)
        if not spec.startswith("se/"):
            raise UserInputError(f"se={se!r} is not an SE spec; choose one of `skf components --kind se`")
        base = dict(self.se_defaults) if spec == resolved_spec(self.default_se) else {}
        kwargs = {**base, **(se_kwargs or {})}

        def build(sem_channels: int, channels: int) -> nn.Module:
            return create(spec, sem_channels=sem_channels, channels=channels, **kwargs)

        return build

    def build(
        self,
        skf: bool = True,
        se: str | None = None,
        se_kwargs: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> nn.Module:
        """The network; ``skf=True`` adds SE blocks built from ``se`` (any registered variant that fits)."""
        factory = self.se_factory(se, se_kwargs) if skf else None
        return self.network(skf=skf, se_factory=factory, **overrides)

    def override_keys(self) -> dict[str, inspect.Parameter]:
        """The ``model.*`` overrides a recipe may set (the network's size arguments)."""
        params = dict(inspect.signature(self.network).parameters)
        for internal in ("skf", "se_factory", "se_kwargs", "channels_last"):
            params.pop(internal, None)
        return params

    def check_overrides(self, model: Mapping[str, Any]) -> None:
        """Reject unknown or ill-typed ``model.*`` values before any work (``model.nf=0`` would only break
        in the first forward pass)."""
        from components.recipes import RecipeError

        params = self.override_keys()
        for key, value in model.items():
            if key == "se":
                self.se_factory(value)
                continue
            if key == "se_kwargs":  # builder options of the SE variant (e.g. the bottleneck's inner width)
                if not isinstance(value, Mapping):
                    raise RecipeError(
                        f"model.se_kwargs must be a mapping of SE builder options, got {value!r}"
                    )
                continue
            if key not in params:
                known = ", ".join(sorted([*params, "se", "se_kwargs"]))
                raise RecipeError(f"model.{key}: unknown key for {self.spec}; known: {known}")
            _check_value(self.spec, key, value, params[key].default)

    def check_stages(self, recipe: Any) -> None:
        """Reject a recipe whose stages this family cannot train, before any work, saying what it knows."""
        from components.recipes import RecipeError

        known = {s.name: s for s in self.stages}
        if not self.stages:
            if recipe.stages:
                raise RecipeError(
                    f"{self.spec} trains in one stage; remove `stages` from recipe {recipe.name!r}"
                )
            return
        if not recipe.stages:
            raise RecipeError(
                f"{self.spec} trains in stages ({', '.join(known)}); recipe {recipe.name!r} must list them"
            )
        subnetworks = sorted({m for s in self.stages for m in s.modules})
        for stage in recipe.stages:
            spec = known.get(stage.name)
            if spec is None:
                raise RecipeError(
                    f"stage {stage.name!r} is not a stage of {self.spec}; known: {', '.join(known)}"
                )
            unknown = sorted(set(stage.modules) - set(spec.modules))
            if unknown:
                raise RecipeError(
                    f"stage {stage.name!r} names sub-network(s) {unknown} it cannot train; {self.spec} has "
                    f"{', '.join(subnetworks)} and stage {stage.name!r} trains {', '.join(spec.modules)}"
                )
            terms = sorted(set(stage.losses) - set(spec.losses))
            if terms:
                raise RecipeError(
                    f"stage {stage.name!r} has unknown loss term(s) {terms}; known: {', '.join(spec.losses)}"
                )
        if recipe.stages[-1].name != self.stages[-1].name:
            raise RecipeError(
                f"the last stage of {self.spec} must be {self.stages[-1].name!r} (it holds the SE blocks and "
                f"the semantic losses), got {recipe.stages[-1].name!r}"
            )

    def smoke_steps(self, steps: int) -> dict[str, int]:
        """Recipe overrides that train ``steps`` steps of the image network (:attr:`smoke_stage_steps`):
        ``train.iterations`` alone for a one-stage family, each stage's share and their sum otherwise."""
        if not self.stages:
            return {"train.iterations": steps}
        final = self.stages[-1].name
        if set(self.smoke_stage_steps) != {s.name for s in self.stages} or self.smoke_stage_steps[final] != 1:
            raise TypeError(
                f"{type(self).__name__}.smoke_stage_steps must give every stage, the final one 1.0"
            )
        per_stage = {s.name: max(1, round(steps * self.smoke_stage_steps[s.name])) for s in self.stages}
        return {
            "train.iterations": sum(per_stage.values()),
            **{f"stages.{name}.iterations": n for name, n in per_stage.items()},
        }

    def check_se(self, se: str, model: Mapping[str, Any] | None = None) -> None:
        """Fail at planning time, with the reason, when SE variant ``se`` cannot be built into this network."""
        overrides = {k: v for k, v in (model or {}).items() if k != "se"}
        try:
            with torch.device("meta"):
                self.build(skf=True, se=se, **overrides)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserInputError(f"se={se} does not fit {self.spec}: {exc}") from exc

    def input_features(self) -> dict[str, Callable[[Any], Any]]:
        """``{name: fn(whole low image) -> array}`` the training set computes before cropping (none here)."""
        return {}

    # priors and test-time flow --------------------------------------------------------------------
    def sem_inputs(self, priors: Any, size: tuple[int, int]) -> tuple[Tensor, ...]:
        """The SKB's :class:`~components.skb.Priors` as the tensors the SE slots take, in slot order."""
        maps = {"F0": priors.f0, "F1": priors.f1, "F2": priors.f2}
        out = []
        for slot in self.se_slots:
            out.append(
                priors.full_logits(size, channels_last=True) if slot.prior == "Z" else maps[slot.prior]
            )
        return tuple(out)

    def enhance(
        self, net: nn.Module, low: Tensor, priors_for: PriorsFor | None, *, two_pass: bool = False
    ) -> Tensor:
        """Test-time enhancement of ``low`` (B×3×H×W in [0, 1]), unclamped; ``priors_for`` None: plain.

        The default is one pass with SE priors of the input (the network pads and crops itself); families
        with another flow (DRBN's intermediate priors, SNR's second pass, LLFlow's input) override it.
        """
        if priors_for is None:
            return net(low)
        return net(low, sem=self.sem_inputs(priors_for("input", low), (low.shape[-2], low.shape[-1])))

    def check_skb(self, net: nn.Module, skb: Any) -> None:
        """The SE blocks must be built for the SKB's widths; say which ones differ, not a conv error."""
        provided = dict(zip(("F0", "F1", "F2"), skb.feature_channels, strict=True))
        provided["Z"] = skb.num_classes
        wrong = [
            f"{slot.path} takes {slot.prior} with {need} channels, the SKB gives {provided[slot.prior]}"
            for slot in self.se_slots
            if (need := net.get_submodule(slot.path).sem_channels) != provided[slot.prior]
        ]
        if wrong:
            from components.inference import EnhancerSpecError

            raise EnhancerSpecError(
                f"SKB {skb.spec} does not fit {self.network.__name__}'s SE blocks: {'; '.join(wrong)}. Use an "
                "SKB with the SKF feature widths (48/96/192, 59 classes) such as skb/hrnet-w48-pascal@1 (or "
                "skb/hrnet-w48-lite@1 for tests)"
            )

    # released checkpoints -------------------------------------------------------------------------
    def load_official(
        self,
        model: nn.Module,
        source: str | os.PathLike[str] | Mapping[str, Tensor],
        *,
        expected_sha256: str | None = None,
    ) -> int:
        """Load a released checkpoint strictly (see :func:`components.baselines.official.load_official_weights`)."""
        from components.baselines.official import load_official_weights

        return load_official_weights(
            model, source, expected_sha256=expected_sha256, prefixes=self.checkpoint_prefixes
        )


def _check_value(spec: str, key: str, value: Any, default: Any) -> None:
    """One ``model.<key>`` value against the default's type: counts must be positive integers."""
    from components.recipes import RecipeError

    if isinstance(default, bool) or default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, int):
        lowest = 0 if key.endswith("_blocks") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise RecipeError(
                f"model.{key}={value!r} is not valid for {spec}: it must be an integer >= {lowest} "
                f"(default {default}); e.g. --set model.{key}={default}"
            )
    elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise RecipeError(
            f"model.{key}={value!r} is not valid for {spec}: it must be a number (default {default})"
        )


_FAMILIES: dict[str, BaselineFamily] = {}


def register_family(cls: type[BaselineFamily]) -> type[BaselineFamily]:
    """Class decorator: one instance per family, its builder registered as ``baseline/<name>@<version>``."""
    family = cls()
    if family.name in _FAMILIES:
        raise ValueError(f"baseline family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    register(family.spec, description=cls.description)(family.build)
    return cls


def _ensure_builtins() -> None:
    import components.baselines  # noqa: F401 - registers the shipped families


def get_family(spec_or_name: str) -> BaselineFamily:
    """The family of ``"drbn"``, ``"baseline/drbn"`` or ``"baseline/drbn@1"``."""
    _ensure_builtins()
    text = spec_or_name.removeprefix("baseline/").split("@", 1)[0]
    if text not in _FAMILIES:
        raise UnknownFamilyError(
            f"no baseline family {spec_or_name!r}; registered: {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[text]


def families() -> list[BaselineFamily]:
    """Every registered family, by name."""
    _ensure_builtins()
    return [_FAMILIES[n] for n in sorted(_FAMILIES)]
