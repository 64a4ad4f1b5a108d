"""Toy routine and dataset for the training-engine tests (importable by spawned DDP workers)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from components.training import InMemoryLogger, StepContext, Trainer, TrainerConfig


class ToyNet(nn.Module):
    """Tiny conv regressor; ``unused`` mimics the SE blocks' tensors that no forward touches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout2d(0.1)  # consumes torch RNG, so resume must restore it
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        self.unused = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.drop(F.relu(self.conv1(x))))


def toy_target(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


class ToyDataset(Dataset):
    """Random 3×8×8 inputs with target ``1 - x``; ``__getitem__`` adds RNG-drawn jitter."""

    def __init__(self, n: int = 10, *, nan_index: int | None = None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 8, 8, generator=g)
        if nan_index is not None:
            self.x[nan_index, 0, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i] + 0.01 * torch.rand(1)  # global-RNG augmentation
        return {"lq": x, "gt": toy_target(x)}


class ToyRoutine:
    """Implements :class:`components.training.TrainingRoutine` for :class:`ToyNet`."""

    def __init__(
        self,
        seed: int = 0,
        *,
        lr: float = 1e-2,
        milestones: tuple[int, ...] = (6, 10),
        nan_grad: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        self.net = ToyNet()
        self.lr = lr
        self.milestones = list(milestones)
        self.nan_grad = nan_grad
        self._opt: dict[str, torch.optim.Optimizer] | None = None
        self._sched: dict[str, torch.optim.lr_scheduler.LRScheduler] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._opt is None:
            self._opt = {"net": torch.optim.Adam(self.net.parameters(), lr=self.lr)}
        return self._opt

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        if self._sched is None:
            opt = self.optimizers()["net"]
            self._sched = {
                "net": torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=0.5)
            }
        return self._sched

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        with ctx.autocast():
            pred = ctx.modules["net"](batch["lq"])
        loss = F.mse_loss(pred.float(), batch["gt"])
        if self.nan_grad:  # value 0, gradient 0·inf = NaN
            w = self.net.conv1.weight
            loss = loss + torch.sqrt((w - w.detach()).pow(2).sum())
        grad_norm = ctx.backward_step(loss, "net")
        return {"loss": loss, "grad_norm": grad_norm}

    def validate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.net(batch["lq"])
        return {"mse": F.mse_loss(pred.float(), batch["gt"])}

    def sample_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = self.net(batch["lq"])
        return torch.cat([batch["lq"][0], pred[0].float(), batch["gt"][0]], dim=2)


def ddp_worker(rank: int, world_size: int, port: int, run_dir: str, out_dir: str) -> None:
    """One rank of a 2-process gloo run; saves its final parameters for the parent to compare."""
    os.environ.update(
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    routine = ToyRoutine(seed=100 + rank)  # different inits: DDP must broadcast rank 0's
    logger = InMemoryLogger()
    config = TrainerConfig(iterations=6, batch_size=2, ckpt_every=3, device="cpu", seed=7)
    result = Trainer(routine, config, run_dir=run_dir, logger=logger).fit(ToyDataset(12))
    torch.save(
        {"params": routine.net.state_dict(), "logged": len(logger.metrics), "step": result.step},
        Path(out_dir) / f"rank{rank}.pt",
    )
