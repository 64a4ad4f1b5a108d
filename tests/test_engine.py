"""Training engine: learning, exact kill-and-resume, non-finite stops, AMP on CPU, MLflow, DDP (gloo)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from engine_fixtures import ToyDataset, ToyRoutine, ddp_worker, toy_target

from components.training import (
    CheckpointError,
    InMemoryLogger,
    NonFiniteLossError,
    Progress,
    Trainer,
    TrainerConfig,
    load_training_state,
)
from components.training.sampler import ResumableSampler


def _config(**kw) -> TrainerConfig:
    base = {"iterations": 11, "batch_size": 4, "device": "cpu", "seed": 3}
    return TrainerConfig(**{**base, **kw})


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"parameter {key} differs"


class _Kill(Exception):
    pass


def _kill_at(step: int):
    def progress(p: Progress) -> None:
        if p.step == step:
            raise _Kill(step)

    return progress


def test_few_steps_lower_the_loss(tmp_path: Path) -> None:
    logger = InMemoryLogger()
    routine = ToyRoutine(lr=2e-2, milestones=(30,))
    result = Trainer(routine, _config(iterations=40, batch_size=4), run_dir=tmp_path, logger=logger).fit(
        ToyDataset(16)
    )
    losses = [v for _, v in logger.history("train/loss")]
    assert result.step == 40 and len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert logger.history("lr/net")[-1][1] == pytest.approx(2e-2 * 0.5)  # scheduler stepped per iteration


@pytest.mark.parametrize("kill_at", [5, 8])  # resume mid-epoch (ckpt 3) and at an epoch boundary (ckpt 6)
def test_kill_and_resume_is_bit_identical(tmp_path: Path, kill_at: int) -> None:
    cfg = _config(ckpt_every=3, keep_last=2)
    data = ToyDataset(10)  # 2 batches of 4 per epoch (drop_last), so the run spans several epochs

    ref_logger, ref_task = InMemoryLogger(), ToyRoutine()
    ref = Trainer(ref_task, cfg, run_dir=tmp_path / "ref", logger=ref_logger).fit(data)

    with pytest.raises(_Kill):
        Trainer(ToyRoutine(), cfg, run_dir=tmp_path / "run", progress=_kill_at(kill_at)).fit(data)
    saved = load_training_state(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert saved["step"] == (kill_at // 3) * 3

    resumed_logger, resumed_task = (
        InMemoryLogger(),
        ToyRoutine(seed=999),
    )  # different init: must be overwritten
    res = Trainer(resumed_task, cfg, run_dir=tmp_path / "run", logger=resumed_logger).fit(data)

    assert res.step == ref.step == 11 and res.epoch == ref.epoch
    _assert_same_params(resumed_task.net, ref_task.net)
    ref_tail = [(s, v) for s, v in ref_logger.history("train/loss") if s > saved["step"]]
    assert resumed_logger.history("train/loss") == ref_tail  # same batches, same dropout masks
    for name in ("ref", "run"):  # keep-last-2: step 9 and the final step 11
        assert sorted(p.name for p in (tmp_path / name / "checkpoints").glob("step-*.pt")) == [
            "step-00000009.pt",
            "step-00000011.pt",
        ]


def test_resume_restores_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    cfg = _config(iterations=4, ckpt_every=4)
    routine = ToyRoutine()
    Trainer(routine, cfg, run_dir=tmp_path).fit(ToyDataset(10))
    state = load_training_state(tmp_path / "checkpoints" / "latest.pt")
    adam = state["optimizers"]["net"]["state"]
    assert 0 not in adam and adam[1]["step"].item() == 4  # index 0 is ToyNet.unused: never has a grad
    assert state["schedulers"]["net"]["last_epoch"] == 4
    assert (state["epoch"], state["consumed"]) == (1, 2)  # 2nd epoch fully consumed
    for key in ("python", "numpy", "torch", "cuda"):
        assert key in state["rng"][0]


def test_nan_batch_stops_with_last_good_checkpoint(tmp_path: Path) -> None:
    # No shuffle, batch 2: sample 4 is in the 3rd batch, checkpoints every 2 steps.
    cfg = _config(iterations=8, batch_size=2, ckpt_every=2, shuffle=False)
    routine = ToyRoutine()
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(routine, cfg, run_dir=tmp_path / "run").fit(ToyDataset(8, nan_index=4))
    err = info.value
    assert err.step == 3 and "loss" in err.name
    assert "step 3" in str(err) and "latest.pt" in str(err)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert err.last_checkpoint == latest
    state = load_training_state(latest)
    assert state["step"] == 2
    assert sorted(p.name for p in latest.parent.glob("step-*.pt")) == ["step-00000002.pt"]
    assert all(torch.isfinite(t).all() for t in state["modules"]["net"].values())

    # The checkpoint equals a clean 2-step run on the same data order.
    clean = ToyRoutine()
    Trainer(clean, cfg.model_copy(update={"iterations": 2}), run_dir=tmp_path / "clean").fit(ToyDataset(8))
    fresh = ToyRoutine(seed=5)
    fresh.net.load_state_dict(state["modules"]["net"])
    _assert_same_params(fresh.net, clean.net)


def test_nan_gradient_stops_training(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(ToyRoutine(nan_grad=True), _config(), run_dir=tmp_path).fit(ToyDataset(8))
    assert info.value.step == 1 and "gradient" in info.value.name
    assert info.value.last_checkpoint is None and not (tmp_path / "checkpoints" / "latest.pt").exists()


def test_amp_flag_is_a_noop_on_cpu(tmp_path: Path) -> None:
    plain, amp = ToyRoutine(), ToyRoutine()
    Trainer(plain, _config(iterations=5), run_dir=tmp_path / "a").fit(ToyDataset(8))
    trainer = Trainer(amp, _config(iterations=5, amp=True), run_dir=tmp_path / "b")
    trainer.fit(ToyDataset(8))
    assert not trainer.scaler.is_enabled()
    _assert_same_params(plain.net, amp.net)


def test_validation_samples_params_and_artifacts_are_logged(tmp_path: Path) -> None:
    logger = InMemoryLogger()
    val = ToyDataset(4, seed=1)
    val_loader = [
        {"lq": val.x[:2], "gt": toy_target(val.x[:2])},
        {"lq": val.x[2:], "gt": toy_target(val.x[2:])},
    ]
    seen: list[Progress] = []
    trainer = Trainer(
        ToyRoutine(),
        _config(iterations=6, val_every=3),
        run_dir=tmp_path,
        logger=logger,
        progress=seen.append,
    )
    result = trainer.fit(ToyDataset(8), val_loader, params={"skb.fingerprint": "abc"})
    assert [s for s, _ in logger.history("val/mse")] == [3, 6]
    assert result.val_metrics["val/mse"] == logger.history("val/mse")[-1][1]
    assert [(s, n) for s, n, _ in logger.images] == [
        (3, "samples/step-00000003.png"),
        (6, "samples/step-00000006.png"),
    ]
    assert logger.images[0][2].shape == (3, 8, 24)
    assert logger.params["skb.fingerprint"] == "abc" and logger.params["trainer.iterations"] == 6
    assert logger.artifacts == [(tmp_path / "checkpoints" / "latest.pt", "checkpoints")]
    assert [p.step for p in seen] == list(range(1, 7)) and seen[2].val_metrics is not None
    assert all(m.training for m in trainer.modules.values())  # eval mode was restored


def test_too_small_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lower batch_size"):
        Trainer(ToyRoutine(), _config(batch_size=16), run_dir=tmp_path).fit(ToyDataset(8))


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "latest.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_training_state(bad)


def test_sampler_skip_reproduces_epoch_tail() -> None:
    full = ResumableSampler(range(10), num_replicas=2, rank=1, seed=4)
    full.set_position(3, 0)
    part = ResumableSampler(range(10), num_replicas=2, rank=1, seed=4)
    part.set_position(3, 2)
    assert list(part) == list(full)[2:] and len(part) == 3


def test_mlflow_logger_records_params_metrics_and_artifacts(tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from components.training.mlflow_logger import MlflowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # file store is opt-in since MLflow 3
    uri = (tmp_path / "mlruns").as_uri()
    val = ToyDataset(2, seed=1)
    with MlflowLogger(uri, "engine-test", run_name="toy") as logger:
        Trainer(
            ToyRoutine(), _config(iterations=4, val_every=2), run_dir=tmp_path / "run", logger=logger
        ).fit(ToyDataset(8), [{"lq": val.x, "gt": toy_target(val.x)}], params={"baseline": "baseline/toy@1"})
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["baseline"] == "baseline/toy@1" and run.data.params["trainer.iterations"] == "4"
    assert [m.step for m in client.get_metric_history(logger.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(logger.run_id, "val/mse")] == [2, 4]
    # MLflow's keyed images: one "samples" sequence over the validation steps
    images = [a.path for a in client.list_artifacts(logger.run_id, "images")]
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png"))
    assert all(p.startswith("images/samples+step+") for p in images) and steps == [2, 4], images
    assert [a.path for a in client.list_artifacts(logger.run_id, "checkpoints")] == ["checkpoints/latest.pt"]


@pytest.mark.slow
def test_ddp_two_process_gloo_gives_identical_params(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path / "run"), str(out)), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 6
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
    assert not torch.equal(r0["params"]["conv1.weight"], ToyRoutine(seed=100).net.conv1.weight)  # it trained
    assert (r0["logged"], r1["logged"]) == (6, 0)  # only rank 0 logs
    state = load_training_state(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not any(k.startswith("module.") for k in state["modules"]["net"])
    assert math.isfinite(float(state["modules"]["net"]["conv1.weight"].sum()))


# ----------------------------------------------------------------------------- data loading
class _SlowData(ToyDataset):
    """Each sample takes ``delay`` seconds to load: the loop must show it waits."""

    def __init__(self, n: int, delay: float) -> None:
        super().__init__(n)
        self.delay = delay

    def __getitem__(self, i: int):
        import time

        time.sleep(self.delay)
        return super().__getitem__(i)


def test_the_loop_reports_its_data_wait(tmp_path: Path) -> None:
    """``perf/data_wait_share`` is the share of step time spent waiting for batches: near 1 when loading
    dominates (4 samples x 50 ms per step), small when the data is in memory."""
    slow, fast = InMemoryLogger(), InMemoryLogger()
    Trainer(ToyRoutine(), _config(iterations=6, log_every=3), run_dir=tmp_path / "slow", logger=slow).fit(
        _SlowData(16, delay=0.05)
    )
    Trainer(ToyRoutine(), _config(iterations=6, log_every=3), run_dir=tmp_path / "fast", logger=fast).fit(
        ToyDataset(16)
    )
    slow_share = [v for _, v in slow.history("perf/data_wait_share")]
    assert [s for s, _ in slow.history("perf/data_wait_share")] == [3, 6]
    assert all(0.7 < v <= 1.0 for v in slow_share), slow_share
    steps = [v for _, v in slow.history("perf/step_s")]
    assert all(v >= 4 * 0.05 for v in steps), steps  # the wait is part of the step time
    assert max(v for _, v in fast.history("perf/data_wait_share")) < 0.7


class _SeededData(ToyDataset):
    """Jitter drawn from ``(epoch, index)``, as the engine asks of datasets loaded by workers."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.epoch * 1000 + i)
        x = self.x[i] + 0.01 * torch.rand(1, generator=g)
        return {"lq": x, "gt": toy_target(x)}


def test_loader_workers_train_the_same_weights(tmp_path: Path) -> None:
    """Workers are how the data arrives, not what is trained: 2 workers reach the weights of none, across
    an epoch boundary (16 samples, batch 4, 6 steps)."""
    results = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        routine = ToyRoutine()
        Trainer(routine, _config(iterations=6, num_workers=workers), run_dir=tmp_path / str(workers)).fit(
            _SeededData(16)
        )
        results[workers] = routine.net
    _assert_same_params(results[0], results[2])


def test_data_workers_default_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from components.training.engine import data_workers

    assert data_workers(3, torch.device("cpu")) == 3
    assert data_workers(None, torch.device("cpu")) == 0  # workers would take the step's cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data_workers(None, torch.device("cuda", 0)) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPUs share the host's 32 CPUs
    assert data_workers(None, torch.device("cuda", 0)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data_workers(None, torch.device("cuda", 0)) == 0
