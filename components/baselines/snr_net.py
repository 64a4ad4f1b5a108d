"""SNR-Net (Xu et al., CVPR 2022) and SNR-SKF: the family, its test-time flow and its training step.

SNR-SKF puts SE blocks at three decoder scales fed by the SKB's F0 (full), F1 (1/2) and F2 (1/4) features of
the low-light input; the released test optionally re-segments the first output and runs again
(docs/method.md §6.2). No SA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from components.baselines.family import BaselineFamily, PriorsFor, SESlot, register_family
from components.recipes import Recipe
from components.skb import Priors
from components.training.engine import StepContext
from components.training.routines import BaselineRoutine, TrainingSetupError
from models.snr_net import SNRNet, snr_mask

__all__ = ["SNRNetFamily", "SNRRoutine"]


class SNRRoutine(BaselineRoutine):
    """SNR-Net and SNR-SKF training (docs/method.md §6.2): Charbonnier-sum + 10⁴·SCH every 50 steps."""

    def __init__(self, family: BaselineFamily, net: nn.Module, recipe: Recipe, skb: nn.Module | None) -> None:
        super().__init__(family, net, recipe, skb)
        if self.skf.skb_input == "intermediate":
            raise TrainingSetupError("SNR-SKF segments a fixed image: set skf.skb_input to 'lq' or 'gt'")

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        priors, sem, sch_due = self.step_priors(batch, step)
        with ctx.autocast():
            pred = ctx.modules["net"](low, sem=sem)
        rec = self.reconstruction(pred, high, step)
        metrics = {"rec": rec.detach()}
        loss = rec + self.semantic_losses(ctx, pred.float(), high, priors, sch_due, metrics)
        ctx.backward_step(loss, "net", name="loss")
        metrics["loss"] = loss.detach()
        return metrics

    def enhance(self, low: Tensor, batch: Mapping[str, Any] | None = None) -> Tensor:
        """Priors of the input, then (``two_pass_test``) of the first output clamped to [0, 1]."""
        if not self.skf.se:
            return self.family.enhance(self.net, low, None)

        def priors_for(stage: str, image: Tensor) -> Priors:
            if stage == "output":
                return self._run_skb(image.clamp(0, 1), grad=False, labels=(batch or {}).get("labels"))
            return self.test_priors(batch or {"low": low})

        two_pass = self.skf.two_pass_test and self.skb is not None
        return self.family.enhance(self.net, low, priors_for, two_pass=two_pass)


@register_family
class SNRNetFamily(BaselineFamily):
    name = "snr-net"
    description = "SNR-aware network (CVPR 2022); skf=True adds SE blocks at 3 scales"
    network = SNRNet
    default_se = "se/restormer-xattn-dual-gated@1"
    se_slots = (SESlot("att_block_1", "F0"), SESlot("att_block_2", "F1"), SESlot("att_block_3", "F2"))
    supports_two_pass = True
    sch_preset = "snr"
    routine = SNRRoutine
    smoke_model = {"nf": 16, "light_blocks": 1, "n_layers": 1, "heads": 2, "d_inner": 32}

    def enhance(
        self, net: nn.Module, low: Tensor, priors_for: PriorsFor | None, *, two_pass: bool = False
    ) -> Tensor:
        """SNR mask of the input; SE priors of the input, and with ``two_pass`` of the first output."""
        mask = snr_mask(low)
        if priors_for is None:
            return net(low, mask)
        size = (low.shape[-2], low.shape[-1])
        out = net(low, mask, sem=self.sem_inputs(priors_for("input", low), size))
        if two_pass:
            out = net(low, mask, sem=self.sem_inputs(priors_for("output", out), size))
        return out
