"""LLFlow-S and LLFlow-L (Wang et al., AAAI 2022), plain and with SKF: the families and their training step.

LLFlow-SKF puts SE blocks on the flow's conditioning features: F0 on ``fea_up0`` (1/8), F1 on ``fea_up1``
(1/4), F2 on ``fea_up2`` (1/2), from the SKB run on the *log* low-light image; SCH compares the per-class
histograms of the colour map μ and the latent z inside the NLL; no SA (docs/method.md §6.3).

Training encodes the GT and minimises the NLL; testing decodes from the colour map (heat ignored, as
released). Inputs are reflect-padded to a multiple of 8 and cropped back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from components.baseline_losses import FlowNLLLoss
from components.baselines.family import BaselineFamily, PriorsFor, SESlot, register_family
from components.recipes import Recipe
from components.skb import reflect_pad_to_multiple
from components.training.engine import StepContext
from components.training.routines import BaselineRoutine, TrainingSetupError
from models.llflow import LLFlow, LLFlowL, equalize_histogram

__all__ = ["LLFlowLFamily", "LLFlowRoutine", "LLFlowSFamily", "histeq_feature"]

NLL_LOSS = "flow-nll"


def histeq_feature(low: np.ndarray) -> np.ndarray:
    """The histogram-equalised copy (HWC uint8) of a whole low-light image, computed before any crop."""
    image = torch.from_numpy(np.ascontiguousarray(low)).permute(2, 0, 1)[None].float() / 255.0
    return (equalize_histogram(image)[0].permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()


class LLFlowRoutine(BaselineRoutine):
    """LLFlow and LLFlow-SKF training (docs/method.md §6.3): NLL of the GT, + SCH(μ, z) with SKF."""

    def __init__(self, family: BaselineFamily, net: nn.Module, recipe: Recipe, skb: nn.Module | None) -> None:
        super().__init__(family, net, recipe, skb)
        if self.skf.enabled and self.skf.skb_input != "lq":
            raise TrainingSetupError(
                "LLFlow-SKF segments the low-light input (in the log domain): set skf.skb_input to 'lq'"
            )
        term = self.rec_losses.get(NLL_LOSS)
        if term is None or not isinstance(term[0], FlowNLLLoss):
            raise TrainingSetupError(
                f"recipe {recipe.name!r} trains a flow: its losses must include '{NLL_LOSS}' (see configs/recipes/llflow-s.yaml)"
            )
        self.nll: FlowNLLLoss = term[0]

    def train_step(self, batch: Mapping[str, Any], step: int, ctx: StepContext) -> dict[str, Tensor]:
        low, high = batch["low"], batch["high"]
        priors, sem, sch_due = self.step_priors(batch, step)
        with ctx.autocast():
            enc = ctx.modules["net"](low, sem, histeq=batch.get("histeq"), gt=high)
        z, color_map = enc.z.float(), enc.color_map.float()
        mean = self.nll.choose_mean(color_map, high)
        enc = enc._replace(z=z, color_map=color_map, logdet=enc.logdet.float(), mean=mean)
        nll = self.reconstruction(enc, high, step)
        ctx.check_finite(nll, "loss 'nll'")  # a flow's likelihood is the first thing to blow up: say so
        loss = nll
        metrics = {"nll": nll.detach()}
        if sch_due:  # SCH(μ, z), gradients to both, as released
            assert priors is not None and self.sch is not None
            sch = self.sch(mean, z, priors.labels(high.shape[-2:]), differentiate_target=True)
            loss = loss + sch
            metrics["sch"] = sch.detach()
        ctx.backward_step(loss, "net", name="loss")
        metrics["loss"] = loss.detach()
        return metrics


class _LLFlowFamily(BaselineFamily):
    """What LLFlow-S and LLFlow-L share: slots, test-time flow, SCH preset, the full-image histeq."""

    se_slots = (SESlot("att_block_1", "F0"), SESlot("att_block_2", "F1"), SESlot("att_block_3", "F2"))
    sch_preset = "llflow"
    routine = LLFlowRoutine
    side_protocols = ("gt-mean",)  # the paper's LLFlow rows are GT-mean numbers
    # the released test segments the log image with train-mode BN, one image at a time
    released_skb_settings = {"input_transform": "log", "bn_mode": "train"}
    smoke_recipe = {"train.precision": "fp32"}

    def input_features(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        return {"histeq": histeq_feature}

    def enhance(
        self, net: nn.Module, low: Tensor, priors_for: PriorsFor | None, *, two_pass: bool = False
    ) -> Tensor:
        """Pad to a multiple of 8 (reflect), decode from the colour map, crop back to the input size."""
        h, w = low.shape[-2:]
        padded = reflect_pad_to_multiple(low, int(getattr(net, "stride", 8)))
        sem = self.sem_inputs(priors_for("input", low), (h, w)) if priors_for is not None else None
        return net(padded, sem)[..., :h, :w]


@register_family
class LLFlowSFamily(_LLFlowFamily):
    name = "llflow-s"
    description = "LLFlow-S (nf 32, 4 RRDB, K 4, L 3); skf=True adds SE on the flow's conditions"
    network = LLFlow
    default_se = "se/restormer-xattn-gdfn@1"
    smoke_model = {"nf": 8, "nb": 2, "flow_steps": 1, "hidden": 16}


@register_family
class LLFlowLFamily(_LLFlowFamily):
    name = "llflow-l"
    description = "LLFlow-L (nf 64, 24 RRDB, K 12, L 3, LLFlow_pc_small); skf=True adds 192-wide SE blocks"
    network = LLFlowL
    default_se = "se/restormer-xattn-bottleneck@1"
    # the released 192-wide SE bottleneck would dwarf this network: the smoke SE runs 16 wide
    smoke_model = {
        "nf": 8,
        "nb": 2,
        "flow_steps": 1,
        "hidden": 16,
        "stack_blocks": [1],
        "se_kwargs": {"inner": 16},
    }
