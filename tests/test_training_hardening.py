"""Training under adverse conditions: concurrent identical runs, a lost catalog, early failures, bad input.

Every training here is a 16-channel SNR-Net (no SKB, except a stand-in one where priors are missing) for
4-6 steps on 32x32 crops, run in-process through :func:`components.training.job.run_training` or the ``skf`` CLI
boundary (:func:`flows.cli.main`). Each test fails on the code before issue 15's fixes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.data_fixtures import lose_catalog
from tests.pipeline_fixtures import install_work_spies, make_tiny_dataset

TINY = {
    "model.nf": 16,
    "model.light_blocks": 1,
    "model.n_layers": 1,
    "model.heads": 2,
    "model.d_inner": 64,
    "train.iterations": 4,
    "train.batch_size": 2,
    "train.crop": 32,
    "train.ckpt_every": 2,
    "train.val_every": 2,
    "scheduler.name": "constant",
    "scheduler.milestones": None,
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("hardening") / "data")


@pytest.fixture()
def fast_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    import components.training.job

    monkeypatch.setattr(components.training.job, "WAIT_POLL_S", 0.05, raising=False)


def _ingest(source: Path) -> str:
    from components.data.ingest import ingest

    return ingest(str(source), name="tiny", layout="lol").ref


def _plan(**overrides: Any) -> Any:
    from components.training.plan import plan

    return plan(baseline="baseline/snr-net@1", skb="off", overrides={**TINY, **overrides}, val_fraction=0.2)


def _rows() -> list[Any]:
    import sqlalchemy as sa

    from components.catalog import TrainingRun, open_catalog

    with open_catalog().session() as session:
        return list(session.scalars(sa.select(TrainingRun)))


def _mlflow() -> Any:
    from mlflow import MlflowClient

    from components.settings import get_settings

    return MlflowClient(get_settings().mlflow_tracking_uri)


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``skf ARGV``; it must exit non-zero with exactly one ``error:`` line and no traceback."""
    from flows.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    # Third-party log records (torch's "no CUDA runtime" warning) may precede it; nothing follows it.
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    assert "Traceback" not in err
    return errors[0]


def _cli_args(overrides: dict[str, Any] | None = None) -> list[str]:
    """``--set`` options for the same configuration as :func:`_plan` (so the config hash matches)."""
    import yaml

    out = ["--skb", "off", "--val-fraction", "0.2"]
    for key, value in {**TINY, **(overrides or {})}.items():
        out += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).splitlines()[0]}"]
    return out


def _run_dir(digest: str) -> Path:
    from components.settings import get_settings

    return get_settings().home / "runs" / digest[:16]


def _only_run_failed() -> Any:
    """The single TrainingRun row, which must be failed (lease freed) with its MLflow run FAILED."""
    rows = _rows()
    assert [(r.status, r.lease_holder) for r in rows] == [("failed", None)]
    assert rows[0].mlflow_run_id, "the attempt has an MLflow run"
    assert _mlflow().get_run(rows[0].mlflow_run_id).info.status == "FAILED"
    return rows[0]


# --------------------------------------------------------------------------------------------------
# 1. Two identical trainings at once: one trains, the other waits and joins its result
# --------------------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_backend(request: pytest.FixtureRequest, skf_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from components.catalog import close_catalogs

    if request.param == "postgres":
        monkeypatch.setenv("SKF_CATALOG_URL", request.getfixturevalue("postgres_url"))
    yield request.param
    close_catalogs()


def test_concurrent_identical_trainings_train_once_and_share_the_result(
    catalog_backend: str,
    tiny_dataset: Path,
    fast_waits: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from components.training.job import run_training

    ref = _ingest(tiny_dataset)
    work = install_work_spies(monkeypatch)
    first_started, second_waiting = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def first_log(msg: str) -> None:
        if msg.startswith("training"):
            first_started.set()

    def hold_until_the_second_waits(p: Any) -> None:
        if p.step == 1:  # keep training until the identical request is provably waiting on the lease
            assert second_waiting.wait(60)

    def second_log(msg: str) -> None:
        if "waiting to join" in msg:
            second_waiting.set()

    def run(name: str, **kwargs: Any) -> None:
        try:
            results[name] = run_training(ref, _plan(), **kwargs)
        except BaseException as exc:  # reported by the assertions below
            results[name] = exc

    first = threading.Thread(
        target=run, args=("first",), kwargs={"log": first_log, "progress": hold_until_the_second_waits}
    )
    first.start()
    assert first_started.wait(120), results
    second = threading.Thread(target=run, args=("second",), kwargs={"log": second_log})
    second.start()
    first.join(300)
    second.join(300)

    a, b = results["first"], results["second"]
    assert not isinstance(a, BaseException), a
    assert not isinstance(b, BaseException), b
    assert (a.status, b.status) == ("trained", "joined")
    assert (b.run_id, b.checkpoint_uri, b.config_hash, b.steps) == (
        a.run_id,
        a.checkpoint_uri,
        a.config_hash,
        4,
    )
    assert b.metrics == a.metrics
    assert work.train_steps == 4  # trained once

    client = _mlflow()
    for key in ("train/loss", "val/psnr"):
        steps = [m.step for m in client.get_metric_history(a.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert sorted(m.step for m in client.get_metric_history(a.run_id, "train/loss")) == [1, 2, 3, 4]
    rows = _rows()
    assert [(r.status, r.mlflow_run_id, r.lease_holder) for r in rows] == [("finished", a.run_id, None)]


# --------------------------------------------------------------------------------------------------
# 2. The catalog lost mid-run: the run fails loudly, and the next command does not start an empty one
# --------------------------------------------------------------------------------------------------
def test_catalog_lost_during_training_fails_the_run_and_is_not_recreated(
    catalog_backend: str,
    tiny_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from components.catalog import CatalogLostError, close_catalogs
    from components.settings import get_settings
    from components.training.job import run_training

    ref = _ingest(tiny_dataset)
    logged: list[str] = []

    def lose_at_step_2(p: Any) -> None:
        if p.step == 2:
            lose_catalog(get_settings().catalog_url)

    with pytest.raises(CatalogLostError, match="results were not recorded|can no longer be read") as lost:
        run_training(ref, _plan(), progress=lose_at_step_2, log=logged.append)
    assert "restore" in str(lost.value)
    run_id = next(m.split("MLflow run ")[1].split(",")[0] for m in logged if m.startswith("training"))
    assert _mlflow().get_run(run_id).info.status == "FAILED"  # not FINISHED into a catalog that is gone

    close_catalogs()  # the next command, in a new process
    line = _cli_error(["train", ref, *_cli_args()], capsys)
    assert "is missing or empty, but one was created there" in line and "SKF_CATALOG_RESET=1" in line
    if catalog_backend == "sqlite":
        from components.settings import get_settings

        assert not (get_settings().home / "catalog.db").exists()

    monkeypatch.setenv("SKF_CATALOG_RESET", "1")  # the documented way to start over deliberately
    line = _cli_error(["train", ref, *_cli_args()], capsys)
    assert "tiny" in line and "missing or empty" not in line  # a new, empty catalog: no such dataset


# --------------------------------------------------------------------------------------------------
# 3. A truncated latest.pt: resume from the newest intact step-*.pt, with a warning, to the same weights
# --------------------------------------------------------------------------------------------------
def test_checkpoint_manager_falls_back_past_damaged_checkpoints(tmp_path: Path) -> None:
    from components.training.checkpoint import FORMAT_VERSION, CheckpointError, CheckpointManager

    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    for step in (2, 4, 6):
        manager.save({"format": FORMAT_VERSION, "step": step}, step)
    latest = manager.latest_path
    damaged = latest.read_bytes()[:100]
    latest.unlink()
    latest.write_bytes(damaged)  # a truncated copy (a new file, not the link to step 6)
    with pytest.warns(RuntimeWarning, match=r"newer checkpoint\(s\) are damaged: latest.pt"):
        path, state = manager.load_latest()
    assert (path.name, state["step"]) == ("step-00000006.pt", 6)

    for step in (6, 4):  # truncated in place: the snapshots they link to are gone too
        (manager.directory / f"step-{step:08d}.pt").write_bytes(damaged)
    with pytest.warns(RuntimeWarning, match="step-00000006.pt .*step-00000004.pt"):
        path, state = manager.load_latest()
    assert state["step"] == 2

    (manager.directory / "step-00000002.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*delete that folder"):
        manager.load_latest()
    assert CheckpointManager(tmp_path / "none").load_latest() is None


def _final_weights(digest: str) -> dict[str, Any]:
    from components.training.checkpoint import load_training_state

    return load_training_state(_run_dir(digest) / "checkpoints" / "latest.pt")["modules"]["net"]


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _mlflow().get_metric_history(run_id, key))


def test_truncated_latest_checkpoint_resumes_from_the_newest_intact_step(
    skf_home: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from components.catalog import close_catalogs
    from components.training.job import TrainingInterrupted, run_training

    plan = _plan(**{"train.iterations": 6})
    ref = _ingest(tiny_dataset)
    with pytest.raises(TrainingInterrupted):
        run_training(ref, plan, stop_after_step=4, log=lambda _m: None)
    (row,) = _rows()
    latest = _run_dir(row.config_hash) / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:4096])  # truncated in place: step-4, its link, goes with it

    with pytest.warns(
        RuntimeWarning, match=r"resuming from .*step-00000002.pt: newer checkpoint\(s\) are damaged"
    ):
        resumed = run_training(ref, plan, log=lambda _m: None)
    assert (resumed.status, resumed.steps, resumed.run_id) == ("resumed", 6, row.mlflow_run_id)
    weights = _final_weights(resumed.config_hash)

    # The same training without the interruption, in a fresh home: the same weights and metric values.
    close_catalogs()
    home = tmp_path / "reference-home"
    home.mkdir()
    monkeypatch.setenv("SKF_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (home / "mlruns").as_uri())
    reference = run_training(_ingest(tiny_dataset), plan, log=lambda _m: None)
    assert (reference.status, reference.config_hash) == ("trained", resumed.config_hash)
    expected = _final_weights(reference.config_hash)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    expected_loss = _history(reference.run_id, "train/loss")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (skf_home / "mlruns").as_uri())
    assert _history(resumed.run_id, "train/loss") == expected_loss  # steps 3-4 were not logged twice
    assert [s for s, _ in expected_loss] == [1, 2, 3, 4, 5, 6]
    close_catalogs()


# --------------------------------------------------------------------------------------------------
# 4. Failures before the training loop: the catalog row and the MLflow run end failed, not running
# --------------------------------------------------------------------------------------------------
def test_a_dataset_that_cannot_be_trained_on_marks_the_run_failed(
    skf_home: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    one_pair = tmp_path / "one-pair"
    shutil.copytree(tiny_dataset, one_pair)
    for role in ("low", "high"):
        for path in sorted((one_pair / "our485" / role).iterdir())[1:]:
            path.unlink()
    ref = _ingest(one_pair)
    line = _cli_error(["train", ref, *_cli_args()], capsys)
    assert f"dataset {ref} cannot be trained on" in line and "validation split" in line
    _only_run_failed()


def test_missing_priors_mark_the_run_failed(
    skf_home: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import components.precompute
    import components.training.job
    from components.prior_cache import MissingPriorsError
    from components.training.job import run_training
    from components.training.plan import plan

    skb = types.SimpleNamespace(spec="skb/hrnet-w48-pascal@1", fingerprint="f" * 64, pretrained=False)
    monkeypatch.setattr(components.training.job, "build_skb", lambda plan, device=None: skb)
    monkeypatch.setattr(
        components.precompute,
        "precompute_priors",
        lambda *a, **k: types.SimpleNamespace(failed=2, errors={"ab" * 32: "cannot decode the image"}),
    )
    training_plan = plan(
        baseline="baseline/snr-net@1", skb="skb/hrnet-w48-pascal@1", overrides=TINY, val_fraction=0.2
    )
    assert training_plan.recipe.skf.skb_mode == "cached"
    with pytest.raises(MissingPriorsError, match="priors missing for 2 training image"):
        run_training(_ingest(tiny_dataset), training_plan, log=lambda _m: None)
    _only_run_failed()


# --------------------------------------------------------------------------------------------------
# 5. Validation metrics survive a crash: the checkpoint-step metric, and the last metrics on resume
# --------------------------------------------------------------------------------------------------
def test_a_crash_in_the_checkpoint_step_validation_does_not_lose_its_metric(
    skf_home: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.training.engine import Trainer
    from components.training.job import run_training

    validate = Trainer._validate
    crashes = [2]  # the first validation of step 2 (a checkpoint step) dies: a kill, an OOM

    def crashing_validate(self: Any, loader: Any, ctx: Any, step: int) -> Any:
        if crashes and step == crashes[0]:
            crashes.pop()
            raise RuntimeError("simulated crash during validation")
        return validate(self, loader, ctx, step)

    monkeypatch.setattr(Trainer, "_validate", crashing_validate)
    ref = _ingest(tiny_dataset)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(ref, _plan(), log=lambda _m: None)
    outcome = run_training(ref, _plan(), log=lambda _m: None)
    assert outcome.steps == 4
    assert [s for s, _ in _history(outcome.run_id, "val/psnr")] == [2, 4]
    assert [s for s, _ in _history(outcome.run_id, "train/loss")] == [1, 2, 3, 4]


def test_a_run_resumed_after_its_last_checkpoint_still_reports_its_metrics(
    skf_home: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import components.training.job
    from components.training.job import run_training

    package = components.training.job.log_package

    def crash_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(components.training.job, "log_package", package)
        raise RuntimeError("simulated crash after the final checkpoint")

    monkeypatch.setattr(components.training.job, "log_package", crash_once)
    work = install_work_spies(monkeypatch)
    ref = _ingest(tiny_dataset)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(ref, _plan(), log=lambda _m: None)
    outcome = run_training(ref, _plan(), log=lambda _m: None)
    assert (outcome.status, outcome.steps, work.train_steps) == ("resumed", 4, 4)  # nothing retrained
    logged = {k: _history(outcome.run_id, k)[-1] for k in ("train/loss", "val/psnr")}
    assert logged["train/loss"] == (4, outcome.metrics["train/loss"])
    assert logged["val/psnr"] == (4, outcome.metrics["val/psnr"])
    assert _mlflow().get_run(outcome.run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------------------------------
# 6. `skf train` failures the user can fix: one `error:` line, a non-zero exit, no traceback
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("model.nf=!!python/object/apply:os.system ['touch {marker}']", "not a plain YAML value"),
        ("model.nf=0", "model.nf=0 is not valid for baseline/snr-net@1: it must be an integer >= 1"),
        ("model.nf=wide", "model.nf='wide' is not valid"),
        ("model.bogus=1", "model.bogus: unknown key"),
        ("train.iterations=-1", "train.iterations"),
        ("train.iterations", "expected KEY=VALUE"),
    ],
)
def test_bad_set_values_are_one_line_errors(
    skf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, needle: str
) -> None:
    marker = tmp_path / "pwned"
    line = _cli_error(["train", "tiny@1", "--skb", "off", "--set", value.format(marker=marker)], capsys)
    assert needle in line, line
    assert not marker.exists()
    assert _rows() == []  # refused before any work


def test_an_unreachable_catalog_is_one_line_and_debug_shows_the_traceback(
    skf_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.catalog import CatalogError
    from flows.cli import main
    from tests.conftest import free_port

    monkeypatch.setenv("SKF_CATALOG_URL", f"postgresql+psycopg2://skf:pw-123@127.0.0.1:{free_port()}/skf")
    line = _cli_error(["train", "tiny@1", "--skb", "off"], capsys)
    assert line.startswith("error: cannot open the catalog postgresql+psycopg2://skf:***@127.0.0.1:")
    assert "pw-123" not in line and "SKF_CATALOG_URL" in line
    with pytest.raises(CatalogError):
        main(["--debug", "train", "tiny@1", "--skb", "off"])


def test_missing_or_bad_skb_checkpoints_are_one_line_errors(
    skf_home: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = _ingest(tiny_dataset)
    missing = tmp_path / "missing.pth"
    line = _cli_error(["train", ref, "--skb-checkpoint", str(missing)], capsys)
    assert str(missing) in line
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    line = _cli_error(["train", ref, "--skb-checkpoint", str(garbage)], capsys)
    assert str(garbage) in line
    assert _rows() == []


def test_damaged_training_checkpoints_are_a_one_line_error(
    skf_home: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.training.job import TrainingInterrupted, run_training

    ref = _ingest(tiny_dataset)
    with pytest.raises(TrainingInterrupted):
        run_training(ref, _plan(), stop_after_step=2, log=lambda _m: None)
    (row,) = _rows()
    for path in (_run_dir(row.config_hash) / "checkpoints").glob("*.pt"):
        path.write_bytes(b"\x80\x02truncated")
    line = _cli_error(["train", ref, *_cli_args()], capsys)
    assert "no intact checkpoint in" in line and "delete that folder to train from scratch" in line
    _only_run_failed()


def test_a_corrupt_dataset_object_is_a_one_line_error(
    skf_home: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.data.ingest import get_version

    ref = _ingest(tiny_dataset)
    for record in get_version(ref).images:  # bit rot in the store, after ingest verified it
        Path(record.uri).write_bytes(b"corrupt")
    line = _cli_error(["train", ref, *_cli_args()], capsys)
    assert f"dataset {ref} has a corrupt stored object" in line and "Re-ingest the dataset" in line
    _only_run_failed()


@pytest.mark.s3
@pytest.mark.parametrize("fault", ["no-credentials", "missing-bucket"])
def test_s3_failures_during_training_are_one_line_errors(
    skf_home: Path,
    tiny_dataset: Path,
    s3_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:
    import logging

    import boto3

    # The loopback S3 server logs each request from its own threads; keep that out of the captured stderr.
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)
    monkeypatch.setenv("SKF_STORAGE_URI", f"s3://{s3_env}/store")
    ref = _ingest(tiny_dataset)
    if fault == "no-credentials":
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(var)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(skf_home / "no-credentials"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(skf_home / "no-config"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        needle = "no usable AWS credentials"
    else:
        bucket = boto3.resource("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).Bucket(s3_env)
        bucket.objects.all().delete()
        bucket.delete()
        needle = f"the bucket {s3_env!r} does not exist"
    line = _cli_error(["train", ref, *_cli_args()], capsys)
    assert needle in line, line
    _only_run_failed()
