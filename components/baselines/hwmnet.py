"""HWMNet (Fan et al., ICIP 2022) and HWMNet-SKF: the family, its test-time flow and its training step.

HWMNet-SKF was never released. Here SE blocks refine the three decoder stages of the M-Net+ (1/4, 1/2, 1/1,
fed by F2, F1, F0 of the low-light input), and SCH and SA judge the output against the ground truth, as the
paper describes for its baselines (docs/method.md §6.5). The plain network's keys equal the published
checkpoint's, so it loads strictly; into HWMNet-SKF the same file loads with only the SE blocks new
(``train.init_checkpoint``), to fine-tune from the published weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from components.baselines.family import BaselineFamily, PriorsFor, SESlot, register_family
from components.training.engine import StepContext
from components.training.routines import BaselineRoutine, TrainingSetupError
from models.hwmnet import HWMNet

__all__ = ["HWMNetFamily", "HWMNetRoutine"]


class HWMNetRoutine(BaselineRoutine):
    """HWMNet and HWMNet-SKF training: Charbonnier (as released) + SCH + SA on the output."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.skf.enabled and self.skf.skb_input not in ("lq", "gt"):
            raise TrainingSetupError("HWMNet-SKF segments a fixed image: set skf.skb_input to 'lq' or 'gt'")

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        size = high.shape[-2:]
        sch_due = self.sch is not None and self.sch.should_apply(step)
        priors = self.fixed_priors(batch) if (self.skf.se or sch_due or self.sa is not None) else None
        sem = self.family.sem_inputs(priors, size) if self.skf.se else None
        with ctx.autocast():
            pred = ctx.modules["net"](low, sem)
        fake = pred.float()
        rec = self.reconstruction(fake, high, step)
        loss = rec
        metrics = {"rec": rec.detach()}
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
        ctx.backward_step(loss, "net", name="loss")
        metrics["loss"] = loss.detach()
        return metrics

    def enhance(self, low: Tensor, batch: Mapping[str, Any] | None = None) -> Tensor:
        if not self.skf.se:
            return self.family.enhance(self.net, low, None)
        return self.family.enhance(
            self.net, low, lambda stage, image: self.test_priors(batch or {"low": low})
        )


@register_family
class HWMNetFamily(BaselineFamily):
    name = "hwmnet"
    description = "HWMNet (ICIP 2022): M-Net+ with half wavelet attention; skf=True adds SE to its decoder"
    network = HWMNet
    default_se = "se/restormer-xattn-gdfn@1"
    se_slots = (SESlot("att_block_1", "F0"), SESlot("att_block_2", "F1"), SESlot("att_block_3", "F2"))
    supports_sa = True  # the paper applies SA to every baseline; only DRBN's code was released
    sch_preset = "snr"
    routine = HWMNetRoutine
    smoke_model = {"wf": 8}

    def enhance(
        self, net: nn.Module, low: Tensor, priors_for: PriorsFor | None, *, two_pass: bool = False
    ) -> Tensor:
        """One pass (the network pads to a multiple of 16 and crops back), SE priors of the input."""
        if priors_for is None:
            return net(low)
        return net(low, sem=self.sem_inputs(priors_for("input", low), (low.shape[-2], low.shape[-1])))
