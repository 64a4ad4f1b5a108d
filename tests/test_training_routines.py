"""Per-baseline training routines: DRBN(-SKF) and SNR-Net(-SKF) steps, SKB modes, and the train entry point."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from components.losses import native_bf16
from components.recipes import load_recipe
from components.skb import Priors
from components.training import InMemoryLogger, Trainer, TrainerConfig
from components.training.routines import TrainingSetupError, build_routine, lr_factor, train, trainer_config

SMALL_DRBN = {"model": {"g0": 8, "growth": 4, "n_layers": 2}}
SMALL_SNR = {
    "model": {"nf": 16, "light_blocks": 1, "n_layers": 1, "heads": 2, "d_inner": 32},
    "scheduler": {"name": "constant", "milestones": None},
}
RUN = {
    "train.iterations": 2,
    "train.batch_size": 2,
    "train.crop": 32,
    "train.val_every": 2,
    "train.ckpt_every": 2,
}


class FakeSKB(nn.Module):
    """Frozen stand-in for the HRNet SKB: 1×1 convs on pooled RGB give W48-shaped priors (F0 48 @1/4,
    F1 96 @1/8, F2 192 @1/16, 59 logits @1/4), differentiable w.r.t. the input when ``grad=True``."""

    num_classes = 59
    fingerprint = "f" * 64
    strides = {"f0": 4, "f1": 8, "f2": 16, "logits": 4}

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.ModuleDict(
            {n: nn.Conv2d(3, c, 1) for n, c in {"f0": 48, "f1": 96, "f2": 192, "logits": 59}.items()}
        )
        self.requires_grad_(False)
        self.calls: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        return {"skb.spec": "skb/fake@1", "skb.pretrained": False, "skb.fingerprint": self.fingerprint}

    def forward(self, x: torch.Tensor, *, grad: bool = False) -> Priors:
        self.calls.append({"grad": grad, "requires_grad": x.requires_grad, "input": x.detach().clone()})
        with torch.enable_grad() if grad else torch.no_grad():
            return Priors(
                **{n: self.proj[n](F.avg_pool2d(x, s, ceil_mode=True)) for n, s in self.strides.items()}
            )


class Pairs(Dataset):
    """32×32 low/high pairs; with ``skb`` each sample carries the priors a prior cache would deliver."""

    def __init__(self, n: int = 4, skb: FakeSKB | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.low = torch.rand(n, 3, 32, 32, generator=g) * 0.3
        self.skb = skb

    def __len__(self) -> int:
        return len(self.low)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"low": self.low[i], "high": (self.low[i] * 3).clamp(0, 1)}
        if self.skb is not None:
            p = self.skb(self.low[i : i + 1])
            sample["priors"] = {"f0": p.f0[0], "f1": p.f1[0], "f2": p.f2[0], "logits": p.logits[0]}
        return sample


def _val_batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    ds = Pairs(n)
    return [{"low": ds.low, "high": (ds.low * 3).clamp(0, 1)}]


def _cfg(**kw: Any) -> TrainerConfig:
    return TrainerConfig(**{"iterations": 2, "batch_size": 2, "device": "cpu", "shuffle": False, **kw})


def _changed(before: nn.Module, after: nn.Module) -> bool:
    return any(
        not torch.equal(a, b)
        for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    )


def test_drbn_skf_step_trains_g_and_d_through_the_skb(tmp_path: Path) -> None:
    skb = FakeSKB()
    skb_before = copy.deepcopy(skb.state_dict())
    routine = build_routine(None, load_recipe("drbn-skf", {**SMALL_DRBN, **RUN}), skb)
    assert set(routine.modules()) == {"net", "disc"}
    net0, disc0 = copy.deepcopy(routine.net), copy.deepcopy(routine.modules()["disc"])
    logger = InMemoryLogger()
    Trainer(routine, _cfg(), run_dir=tmp_path, logger=logger).fit(Pairs(4))

    assert {"train/d_loss", "train/rec", "train/sch", "train/adv", "train/g_loss"} <= set(
        logger.metrics[-1][1]
    )
    assert -3.0 <= logger.history("train/rec")[-1][1] < 0  # −ΣSSIM over three scales
    assert _changed(net0.recur4.fuseblk_1, routine.net.recur4.fuseblk_1)  # SE trained
    assert _changed(net0.recur1, routine.net.recur1)
    assert _changed(disc0, routine.modules()["disc"])  # persistent D trained
    # Per step: r₃ with grad (input carries the graph), ŷ₁ with grad, GT without.
    assert [(c["grad"], c["requires_grad"]) for c in skb.calls[:3]] == [
        (True, True),
        (True, True),
        (False, False),
    ]
    assert len(skb.calls) == 6
    for key, value in skb.state_dict().items():  # SKB stays frozen
        assert torch.equal(value, skb_before[key]) and not any(p.grad is not None for p in skb.parameters())
    # D lr = G lr × 1e-3
    opts = routine.optimizers()
    assert opts["disc"].param_groups[0]["lr"] == pytest.approx(opts["net"].param_groups[0]["lr"] * 1e-3)


def test_drbn_plain_baseline_has_no_skf_parts(tmp_path: Path) -> None:
    routine = build_routine("baseline/drbn", load_recipe("drbn", {**SMALL_DRBN, **RUN}), None)
    assert set(routine.modules()) == {"net"} and not hasattr(routine.net.recur4, "fuseblk_1")
    logger = InMemoryLogger()
    Trainer(routine, _cfg(), run_dir=tmp_path, logger=logger).fit(Pairs(4))
    assert set(logger.metrics[-1][1]) == {
        "train/rec", "train/g_loss", "lr/net", "perf/data_wait_share", "perf/step_s"
    }  # fmt: skip


def test_snr_skf_cached_priors_and_sch_every_n_steps(tmp_path: Path) -> None:
    recipe = load_recipe("snr-net-skf", {**SMALL_SNR, **RUN, "skf": {"sch": {"every": 2}}})
    routine = build_routine(None, recipe, None)  # cached: no SKB in the step
    se0 = copy.deepcopy(routine.net.att_block_1)
    logger = InMemoryLogger()
    Trainer(routine, _cfg(iterations=4), run_dir=tmp_path, logger=logger).fit(Pairs(4, skb=FakeSKB()))
    assert [s for s, _ in logger.history("train/sch")] == [2, 4]
    assert [s for s, _ in logger.history("train/rec")] == [1, 2, 3, 4]
    assert _changed(se0, routine.net.att_block_1)


def test_snr_skf_online_gt_segments_ground_truth_and_tests_in_two_passes(tmp_path: Path) -> None:
    skb = FakeSKB()
    recipe = load_recipe(
        "snr-net-skf", {**SMALL_SNR, **RUN, "skf": {"skb_mode": "online", "skb_input": "gt"}}
    )
    routine = build_routine(None, recipe, skb)
    data = Pairs(2)
    Trainer(routine, _cfg(iterations=1), run_dir=tmp_path).fit(data)
    assert len(skb.calls) == 1 and not skb.calls[0]["grad"]
    torch.testing.assert_close(skb.calls[0]["input"], (data.low * 3).clamp(0, 1))

    skb.calls.clear()
    routine.net.eval()
    with torch.no_grad():
        metrics = routine.validate(_val_batches()[0])
    assert set(metrics) == {"psnr", "ssim"}
    assert len(skb.calls) == 2  # pass 1 on the input, pass 2 on the first output
    torch.testing.assert_close(skb.calls[0]["input"], _val_batches()[0]["low"])


def test_snr_plain_baseline_trains_without_priors(tmp_path: Path) -> None:
    routine = build_routine(None, load_recipe("snr-net", {**SMALL_SNR, **RUN}), None)
    logger = InMemoryLogger()
    Trainer(routine, _cfg(), run_dir=tmp_path, logger=logger).fit(Pairs(4))
    assert "train/sch" not in logger.metrics[-1][1] and not hasattr(routine.net, "att_block_1")


def test_cached_mode_without_priors_names_the_fix(tmp_path: Path) -> None:
    routine = build_routine(None, load_recipe("snr-net-skf", {**SMALL_SNR, **RUN}), None)
    with pytest.raises(TrainingSetupError, match="priors_loader"):
        Trainer(routine, _cfg(), run_dir=tmp_path).fit(Pairs(4))


def test_online_skf_without_skb_is_rejected() -> None:
    with pytest.raises(TrainingSetupError, match="skb="):
        build_routine(None, load_recipe("drbn-skf", {**SMALL_DRBN, **RUN}), None)
    with pytest.raises(TrainingSetupError, match="no training routine"):
        build_routine("loss/sch@1", load_recipe("drbn", SMALL_DRBN), None)


def test_train_entry_point_records_specs_mode_and_fingerprint(tmp_path: Path) -> None:
    logger = InMemoryLogger()
    recipe = load_recipe("drbn-skf", {**SMALL_DRBN, **RUN})
    result = train(
        recipe,
        Pairs(4),
        _val_batches(),
        run_dir=tmp_path,
        skb=FakeSKB(),
        logger=logger,
        device="cpu",
        params={"dataset": "demo@1"},
    )
    p = logger.params
    assert result.step == 2 and (tmp_path / "checkpoints" / "latest.pt").is_file()
    assert p["component.baseline"] == "baseline/drbn@1"
    assert p["component.se"] == "se/restormer-xattn-gdfn@1"
    assert (p["component.sch"], p["component.sa"]) == ("loss/sch@1", "loss/sa@1")
    assert (p["skf.skb_mode"], p["skf.skb_input"]) == ("online", "intermediate")
    # what the SA discriminator's "auto" precision became on this device, next to the recipe's setting
    assert p["recipe.skf.sa.precision"] == "auto"
    assert p["skf.sa.precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert p["skb.fingerprint"] == FakeSKB.fingerprint and p["dataset"] == "demo@1"
    assert p["recipe.optimizer.lr"] == 1e-4 and p["trainer.iterations"] == 2
    assert [s for s, _ in logger.history("val/psnr")] == [2] and logger.images[0][2].shape == (3, 64, 96)


def test_recipe_maps_onto_engine_and_schedule() -> None:
    recipe = load_recipe("snr-net", {"train.precision": "amp", "scheduler": {"warmup": 4}})
    cfg = trainer_config(recipe, device="cpu")
    assert cfg.amp and cfg.batch_size == 16 and cfg.seed == 3407 and cfg.val_every == 200
    f = lr_factor(recipe.scheduler)
    assert [f(0), f(3), f(49_999), f(50_000), f(100_000)] == [0.25, 1.0, 1.0, 0.5, 0.25]
    step = lr_factor(load_recipe("drbn").scheduler)
    assert (step(72_799), step(72_800)) == (1.0, 0.5)


def test_drbn_skf_cached_mode_runs_no_skb_and_uses_the_batch_priors(tmp_path: Path) -> None:
    recipe = load_recipe("drbn-skf", {**SMALL_DRBN, **RUN, "skf": {"skb_mode": "cached", "skb_input": "lq"}})
    routine = build_routine(None, recipe, None)  # cached: no SKB needed, none may run
    net0, disc0 = copy.deepcopy(routine.net), copy.deepcopy(routine.modules()["disc"])
    logger = InMemoryLogger()
    Trainer(routine, _cfg(), run_dir=tmp_path, logger=logger).fit(Pairs(4, skb=FakeSKB()))
    assert {"train/d_loss", "train/sch", "train/adv", "train/g_loss"} <= set(logger.metrics[-1][1])
    assert logger.history("train/sch")[-1][1] > 0
    assert _changed(net0.recur4.fuseblk_3, routine.net.recur4.fuseblk_3)
    assert _changed(disc0, routine.modules()["disc"])
    with pytest.raises(TrainingSetupError, match="priors_loader"):
        Trainer(routine, _cfg(), run_dir=tmp_path / "no-priors").fit(Pairs(4))
