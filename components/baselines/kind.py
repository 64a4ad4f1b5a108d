"""KinD (ACM MM 2019) and KinD++ (IJCV 2021), plain and with SKF: the families and their three stages.

Both train three sub-networks one after the other, as the originals do: ``decom`` (decomposition on low and
high pairs), ``adjust`` (illumination adjustment on the frozen decomposition) and ``restore`` (reflectance
restoration). The SKF variants were never released. Here the SE blocks sit in the restoration net (the
sub-network that produces the image's content), which is trained last, and only it is trained with the
semantic losses (the paper's rule), computed on the enhanced image R̂ · Î with Î from the frozen adjustment
net at the ground truth's ratio (docs/method.md §6.4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from components.baselines.family import BaselineFamily, PriorsFor, SESlot, StageSpec, register_family
from components.kind_losses import (
    KIND_DEFAULT_WEIGHTS,
    KINDPP_DEFAULT_WEIGHTS,
    kind_adjust_terms,
    kind_decom_terms,
    kind_restore_target,
    kind_restore_terms,
    kindpp_adjust_terms,
    kindpp_restore_target,
    kindpp_restore_terms,
)
from components.training.engine import StepContext
from components.training.routines import BaselineRoutine, TrainingSetupError, psnr
from models.kind import KinD, KinDPP

__all__ = ["KinDFamily", "KinDPPFamily", "KinDRoutine"]


class KinDRoutine(BaselineRoutine):
    """One stage of KinD / KinD++ (the family supplies the stage losses and the restoration target)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.stage is None:
            raise TrainingSetupError(f"{self.family.spec} trains in stages (decom, adjust, restore)")
        if self.skf.enabled and self.skf.skb_input not in ("lq", "gt"):
            raise TrainingSetupError(
                f"{self.family.spec} SKF segments a fixed image: skf.skb_input 'lq' or 'gt'"
            )

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        net, losses, name = ctx.modules["net"], self.family.losses, self.stage.name  # type: ignore[union-attr]
        metrics: dict[str, Tensor] = {}
        if name == "decom":
            with ctx.autocast():
                r_low, i_low, r_high, i_high = net(low, stage="decom", high=high)
            loss, metrics = self.weighted(kind_decom_terms(low, high, r_low, i_low, r_high, i_high))
        elif name == "adjust":
            with ctx.autocast():
                i_hat, i_target = net(low, stage="adjust", high=high)
            loss, metrics = self.weighted(losses["adjust"](i_hat.float(), i_target.float()))
        else:
            loss, metrics = self._restore_step(batch, step, ctx)
        ctx.backward_step(loss, "net", name="loss")
        return {**metrics, "loss": loss.detach()}

    def _restore_step(
        self, batch: Mapping[str, Any], step: int, ctx: StepContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        low, high = batch["low"], batch["high"]
        size = high.shape[-2:]
        sch_due = self.sch is not None and self.sch.should_apply(step)
        priors = self.fixed_priors(batch) if (self.skf.se or sch_due or self.sa is not None) else None
        sem = self.family.sem_inputs(priors, size) if self.skf.se else None
        with ctx.autocast():
            r_hat, r_high, i_hat = ctx.modules["net"](low, sem, stage="restore", high=high)
        r_hat = r_hat.float()
        target = self.family.losses["restore_target"](r_high.float())
        loss, metrics = self.weighted(self.family.losses["restore"](r_hat, target))
        fake = r_hat * i_hat.float()  # the enhanced image: the semantic losses judge it against the GT
        if self.sa is not None:
            assert priors is not None
            probs = priors.probabilities(size)
            metrics["d_loss"] = self.discriminator_step(ctx, fake, high, probs)
            adv = self.sa.generator_loss(fake, probs)
            loss = loss + adv
            metrics["adv"] = adv.detach()
        if sch_due:
            assert priors is not None and self.sch is not None
            sch = self.sch(fake, high, priors.labels(size))
            loss = loss + sch
            metrics["sch"] = sch.detach()
        return loss, metrics

    def validate(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Before the restoration stage: how well R·I reconstructs the input; then the enhanced image."""
        if self.stage is not None and self.stage.name != "restore":
            r, i = self.net.decompose(batch["low"])
            return {"recon_psnr": psnr(r * i, batch["low"])}
        return super().validate(batch)

    def enhance(self, low: Tensor, batch: Mapping[str, Any] | None = None) -> Tensor:
        if not self.skf.se:
            return self.family.enhance(self.net, low, None)
        return self.family.enhance(
            self.net, low, lambda stage, image: self.test_priors(batch or {"low": low})
        )


class _KinDFamilyBase(BaselineFamily):
    """What KinD and KinD++ share: slots in ``restore``, stages, test-time flow, SA support."""

    default_se = "se/restormer-xattn-gdfn@1"
    se_slots = (
        SESlot("restore.att_block_1", "F0"),
        SESlot("restore.att_block_2", "F1"),
        SESlot("restore.att_block_3", "F2"),
    )
    supports_sa = True  # the paper applies SA to every baseline; only DRBN's code was released
    sch_preset = "snr"
    routine = KinDRoutine
    # at a CPU budget most steps go to the restoration net (the image), on the same crops as the others
    smoke_recipe = {
        "stages.decom.iterations": 1,
        "stages.adjust.iterations": 1,
        "stages.restore.iterations": 4,
        "stages.restore.scheduler": None,
        "stages.restore.batch_size": None,
        "stages.restore.crop": None,
    }
    #: the stage losses and the restoration target (KinD and KinD++ differ there)
    losses: ClassVar[dict[str, Callable[..., Any]]]

    def enhance(
        self, net: nn.Module, low: Tensor, priors_for: PriorsFor | None, *, two_pass: bool = False
    ) -> Tensor:
        """Decompose, restore R (SE priors of the input), adjust I with the released test ratio (5.0)."""
        if priors_for is None:
            return net(low)
        return net(low, sem=self.sem_inputs(priors_for("input", low), (low.shape[-2], low.shape[-1])))


def _stages(weights: Mapping[str, Mapping[str, float]]) -> tuple[StageSpec, ...]:
    return (
        StageSpec("decom", ("decom",), tuple(weights["decom"])),
        StageSpec("adjust", ("adjust",), tuple(weights["adjust"])),
        StageSpec("restore", ("restore",), tuple(weights["restore"])),
    )


@register_family
class KinDFamily(_KinDFamilyBase):
    name = "kind"
    description = "KinD (ACM MM 2019): decomposition, illumination adjustment, restoration U-Net (+SE)"
    network = KinD
    stages = _stages(KIND_DEFAULT_WEIGHTS)
    losses = {
        "adjust": kind_adjust_terms,
        "restore": kind_restore_terms,
        "restore_target": kind_restore_target,
    }
    smoke_model = {"decom_channels": 8, "restore_channels": 8, "adjust_channels": 8}


@register_family
class KinDPPFamily(_KinDFamilyBase):
    name = "kind-pp"
    description = "KinD++ (IJCV 2021): KinD with the multi-scale illumination attention restoration net (+SE)"
    network = KinDPP
    stages = _stages(KINDPP_DEFAULT_WEIGHTS)
    losses = {
        "adjust": kindpp_adjust_terms,
        "restore": kindpp_restore_terms,
        "restore_target": kindpp_restore_target,
    }
    smoke_model = {"decom_channels": 8, "restore_channels": 8, "adjust_channels": 8}
