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

from torch import Tensor

from components.baselines.family import BaselineFamily, SESlot, register_family
from components.training.engine import StepContext
from components.training.routines import BaselineRoutine
from models.hwmnet import HWMNet

__all__ = ["HWMNetFamily", "HWMNetRoutine"]


class HWMNetRoutine(BaselineRoutine):
    """HWMNet and HWMNet-SKF training: Charbonnier (as released) + SCH + SA on the output."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.require_fixed_skb_input()

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        priors, sem, sch_due = self.step_priors(batch, step)
        with ctx.autocast():
            fake = ctx.modules["net"](low, sem).float()
        rec = self.reconstruction(fake, high, step)
        metrics = {"rec": rec.detach()}
        loss = rec + self.semantic_losses(ctx, fake, high, priors, sch_due, metrics)
        ctx.backward_step(loss, "net", name="loss")
        return {**metrics, "loss": loss.detach()}


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
