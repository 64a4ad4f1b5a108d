"""Model registry against a real MLflow tracking server on loopback: pyfunc round trip and promotion rules."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import free_port
from mlflow import MlflowClient
from serving_fixtures import make_enhancer, random_skb_checkpoint, start_mlflow_server, stop_process

from components import model_registry as mr
from components.model_registry import Candidate, Guard, PromotionPolicy, decide
from components.serving import load_enhancer
from components.tracking import registration_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLflow server (SQLite + proxied artifacts) and a private SKF_HOME for the module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    proc = start_mlflow_server(root, free_port())
    uri = f"http://127.0.0.1:{proc.args[proc.args.index('--port') + 1]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setenv("SKF_HOME", str(root / "skf-home"))
        mp.delenv("SKF_CATALOG_URL", raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)
            stop_process(proc)


@pytest.fixture(scope="module")
def skb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_skb_checkpoint(tmp_path_factory.mktemp("skb") / "tiny-skb.pt")


@pytest.fixture(scope="module")
def pretrained_snr(skb_checkpoint: Path):
    return make_enhancer("baseline/snr-net@1", checkpoint=skb_checkpoint, two_pass=True)


def new_run(experiment: str = "registry-tests") -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    return client.create_run(exp_id).info.run_id


def register(enhancer, name: str, *, psnr: float, ssim: float | None = None, dataset: str = "lol-v2@1", **kw):
    metrics = {"test/psnr": psnr} | ({"test/ssim": ssim} if ssim is not None else {})
    return mr.log_enhancer(
        enhancer,
        run_id=new_run(),
        name=name,
        dataset_version=dataset,
        protocol="paper",
        metrics=metrics,
        bundle_code=kw.pop("bundle_code", False),
        **kw,
    )


def version_tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


def champion(name: str) -> str | None:
    return mr._alias_version(MlflowClient(), name, mr.CHAMPION)


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------
def test_registered_pyfunc_loaded_by_alias_matches_in_memory_model(server: str, pretrained_snr) -> None:
    name = f"skf-roundtrip-{uuid.uuid4().hex[:6]}"
    reg = register(pretrained_snr, name, psnr=21.0, ssim=0.8, bundle_code=True)
    assert reg.challenger and reg.version == "1"
    assert mr.promote(name, reg.version).promoted

    batch = np.random.default_rng(0).random((2, 48, 80, 3), dtype=np.float32)
    with torch.no_grad():
        expected = pretrained_snr(torch.from_numpy(batch).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@{mr.CHAMPION}")
    out = pyfunc.predict(batch)
    assert isinstance(out, np.ndarray) and out.shape == batch.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)

    loaded = load_enhancer(f"models:/{name}@{mr.CHALLENGER}", device="cpu")
    assert not loaded.training and loaded.spec == pretrained_snr.spec
    with torch.no_grad():
        again = loaded(torch.from_numpy(batch).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(again, expected, atol=1e-6)

    # what was stored: weights as safetensors + spec and card JSON, the pyfunc as code -- no pickle
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {
        "artifacts/enhancer.safetensors",
        "artifacts/skb.safetensors",
        "artifacts/enhancer_spec.json",
    } <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    card = json.loads((local / "artifacts" / "model_card.json").read_text())
    assert card["dataset_version"] == "lol-v2@1" and card["protocol"] == "paper"
    assert card["enhancer"]["skb_fingerprint"] == pretrained_snr.skb.fingerprint
    tags = version_tags(name, "1")
    assert tags["skf.skb.fingerprint"] == pretrained_snr.skb.fingerprint
    assert tags["skf.enhancer.baseline"] == "baseline/snr-net@1" and tags["skf.metric.test/psnr"] == "21.0"


def test_drbn_round_trip_through_the_server(server: str, skb_checkpoint: Path) -> None:
    drbn = make_enhancer("baseline/drbn@1", checkpoint=skb_checkpoint)
    name = f"skf-drbn-{uuid.uuid4().hex[:6]}"
    reg = register(drbn, name, psnr=20.0)
    loaded = load_enhancer(f"models:/{name}@{mr.CHALLENGER}", device="cpu")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), drbn(x), atol=1e-6)
    assert version_tags(name, reg.version)["skf.enhancer.baseline"] == "baseline/drbn@1"


# --------------------------------------------------------------------------------------------------
# What the registry shows its users
# --------------------------------------------------------------------------------------------------
def test_registration_reports_the_version_holding_the_challenger_alias(server: str, pretrained_snr) -> None:
    """``search_model_versions`` returns versions without aliases; the rerun summary must not say
    "not challenger" for the alias holder."""
    name = f"skf-alias-{uuid.uuid4().hex[:6]}"
    first = register(pretrained_snr, name, psnr=20.0)
    second = register(pretrained_snr, name, psnr=21.0)
    assert mr._alias_version(MlflowClient(), name, mr.CHALLENGER) == second.version

    found = registration_of(second.run_id, name)
    assert found is not None and found["version"] == second.version and found["challenger"] is True
    older = registration_of(first.run_id, name)
    assert older is not None and older["version"] == first.version and older["challenger"] is False
    assert registration_of(new_run(), name) is None


def test_registered_model_and_version_carry_descriptions(server: str, pretrained_snr) -> None:
    name = f"skf-described-{uuid.uuid4().hex[:6]}"
    reg = register(pretrained_snr, name, psnr=21.25, ssim=0.8, dataset="lol-v2@7")
    client = MlflowClient()
    model = client.get_registered_model(name).description
    assert "baseline/snr-net@1" in model and "skb/hrnet-w48-lite@1" in model and "pretrained" in model
    version = client.get_model_version(name, reg.version).description
    for part in (
        "baseline/snr-net@1",
        "skb/hrnet-w48-lite@1",
        "lol-v2@7",
        "protocol paper",
        "test/psnr=21.2500",
    ):
        assert part in version, (part, version)
    assert "test/ssim=0.8000" in version


#: What MLflow says when a pyfunc is logged without a signature, input example or ``predict`` type hints.
_MISSING_INFO = (
    "Add type hints to the `predict` method",
    "An input example was not provided",
    "Model logged without a signature",
    "Failed to infer model signature",
    "Type hint used in the model's predict function is not supported",
    "does not match the signature inferred",
    "Failed to validate serving input example",
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_registration_emits_no_missing_signature_example_or_type_hint_warnings(
    server: str, pretrained_snr
) -> None:
    handler = _Records()
    mlflow_log = logging.getLogger("mlflow")  # does not propagate to the root logger (caplog)
    mlflow_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reg = register(pretrained_snr, f"skf-quiet-{uuid.uuid4().hex[:6]}", psnr=20.0, bundle_code=True)
    finally:
        mlflow_log.removeHandler(handler)
    said = [str(w.message) for w in caught] + handler.messages
    assert [m for m in said if any(p in m for p in _MISSING_INFO)] == []
    model = mlflow.models.get_model_info(reg.version_uri)
    assert model.signature is not None and model.saved_input_example_info is not None


# --------------------------------------------------------------------------------------------------
# Promotion rules, end to end (tags on version and run)
# --------------------------------------------------------------------------------------------------
def test_promotion_rules_end_to_end(server: str, pretrained_snr) -> None:
    name = f"skf-rules-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()

    def check(version: str, promoted: bool, reason_part: str, policy: PromotionPolicy | None = None) -> None:
        decision = mr.promote(name, version, policy)
        assert decision.promoted is promoted, decision.reason
        assert reason_part in decision.reason
        tags = version_tags(name, version)
        assert tags["skf.promotion.decision"] == ("promoted" if promoted else "rejected")
        assert reason_part in tags["skf.promotion.reason"]
        run_tags = client.get_run(tags["skf.run_id"]).data.tags
        assert run_tags["skf.promotion.decision"] == tags["skf.promotion.decision"]
        assert run_tags["skf.promotion.model"] == f"{name}/{version}"

    random_skb = make_enhancer("baseline/snr-net@1", checkpoint=None)
    v1 = register(random_skb, name, psnr=30.0, ssim=0.9).version
    check(v1, False, "not pretrained")
    assert champion(name) is None

    v2 = register(pretrained_snr, name, psnr=20.0, ssim=0.80).version
    check(v2, True, "no champion yet")
    assert champion(name) == v2

    v3 = register(pretrained_snr, name, psnr=19.5, ssim=0.81).version
    check(v3, False, "does not exceed the margin")

    v4 = register(pretrained_snr, name, psnr=20.05, ssim=0.80).version
    check(v4, False, "does not exceed the margin 0.1", PromotionPolicy(margin=0.1))

    v5 = register(pretrained_snr, name, psnr=21.0, ssim=0.79).version
    check(v5, False, "guard ssim regressed")

    v6 = register(pretrained_snr, name, psnr=21.0, ssim=0.797).version
    check(v6, True, "improved")
    assert champion(name) == v6
    assert version_tags(name, v2)["skf.promotion.superseded_by"] == v6

    v7 = register(pretrained_snr, name, psnr=25.0, ssim=0.9, dataset="lol-v2@2").version
    check(v7, False, "dataset version differs")
    v8 = register(random_skb, name, psnr=40.0, ssim=0.99).version
    check(v8, False, "not pretrained")
    assert champion(name) == v6
    assert mr._alias_version(client, name, mr.CHALLENGER) == v8  # challenger = newest registration


def test_concurrent_promotions_end_with_the_best_champion_and_consistent_tags(
    server: str, pretrained_snr, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both promotions read the champion slowly; the worse one also writes late. Without the lock both
    would see the old champion and the late, worse writer would win; with it they serialise."""
    name = f"skf-race-{uuid.uuid4().hex[:6]}"
    base = register(pretrained_snr, name, psnr=20.0, ssim=0.8).version
    assert mr.promote(name, base).promoted
    good = register(pretrained_snr, name, psnr=22.0, ssim=0.8).version
    best = register(pretrained_snr, name, psnr=23.0, ssim=0.8).version

    read, write = MlflowClient.get_model_version_by_alias, MlflowClient.set_registered_model_alias

    def slow_read(self, model_name, alias):
        time.sleep(0.3)
        return read(self, model_name, alias)

    def late_write(self, model_name, alias, version):
        if alias == mr.CHAMPION and str(version) == good:
            time.sleep(1.0)
        return write(self, model_name, alias, version)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", slow_read)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", late_write)
    decisions: dict[str, mr.PromotionDecision] = {}
    errors: list[BaseException] = []

    def run(version: str) -> None:
        try:
            decisions[version] = mr.promote(name, version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in (good, best)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert champion(name) == best
    assert decisions[best].promoted and version_tags(name, best)["skf.promotion.decision"] == "promoted"
    good_tags = version_tags(name, good)
    if decisions[good].promoted:  # it went first: best was then compared with it
        assert decisions[best].champion_before == good
        assert version_tags(name, good)["skf.promotion.superseded_by"] == best
    else:  # best went first: good was compared with best and lost
        assert decisions[good].champion_before == best and good_tags["skf.promotion.decision"] == "rejected"
        assert decisions[best].champion_before == base


# --------------------------------------------------------------------------------------------------
# Rules and locks without the server
# --------------------------------------------------------------------------------------------------
def cand(
    version: str, psnr: float | None, ssim: float | None = 0.8, lpips: float | None = None, **kw
) -> Candidate:
    metrics = {
        k: v for k, v in (("test/psnr", psnr), ("test/ssim", ssim), ("test/lpips", lpips)) if v is not None
    }
    return Candidate(
        version=version,
        dataset_version=kw.get("dataset", "d@1"),
        protocol=kw.get("protocol", "raw"),
        skb_pretrained=kw.get("pretrained", True),
        metrics=metrics,
    )


@pytest.mark.parametrize(
    ("challenger", "champion_", "policy", "promoted", "reason"),
    [
        (cand("2", 21.0), cand("1", 20.0), PromotionPolicy(), True, "improved"),
        (cand("2", 20.0), cand("1", 20.0), PromotionPolicy(), False, "does not exceed"),
        (cand("2", 20.2), cand("1", 20.0), PromotionPolicy(margin=0.25), False, "margin 0.25"),
        (cand("2", 20.3), cand("1", 20.0), PromotionPolicy(margin=0.25), True, "improved"),
        (cand("2", 21.0, protocol="gt-mean"), cand("1", 20.0), PromotionPolicy(), False, "protocol differs"),
        (cand("2", 21.0, pretrained=False), None, PromotionPolicy(), False, "not pretrained"),
        (cand("2", 21.0, lpips=0.30), cand("1", 20.0, lpips=0.20), PromotionPolicy(), False, "guard lpips"),
        (cand("2", 21.0, lpips=0.204), cand("1", 20.0, lpips=0.20), PromotionPolicy(), True, "improved"),
        (cand("2", 21.0, ssim=None), cand("1", 20.0), PromotionPolicy(), False, "missing for the challenger"),
        (cand("2", None), cand("1", 20.0), PromotionPolicy(), False, "has no 'psnr'"),
        (
            cand("2", 0.1, ssim=None, lpips=None),
            cand("1", 0.2, ssim=None),
            PromotionPolicy(primary="lpips", higher_is_better=False, guards=(Guard("ssim", True, 0.01),)),
            False,
            "has no 'lpips'",
        ),
    ],
)
def test_decide(challenger, champion_, policy, promoted, reason) -> None:
    ok, why, _ = decide(challenger, champion_, policy)
    assert ok is promoted and reason in why, why


def test_policy_round_trips_through_plain_data() -> None:
    policy = PromotionPolicy(primary="ssim", margin=0.01, guards=(Guard("psnr", True, 0.5),))
    assert PromotionPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def _exclusive(lock_url: str | None, home: Path) -> list[tuple[str, float, float]]:
    spans: list[tuple[str, float, float]] = []

    def hold(tag: str) -> None:
        with mr.registry_lock("skf-lock-test", lock_url=lock_url):
            start = time.monotonic()
            time.sleep(0.4)
            spans.append((tag, start, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return sorted(spans, key=lambda s: s[1])


def test_file_lock_excludes_a_second_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKF_HOME", str(tmp_path))
    monkeypatch.delenv("SKF_CATALOG_URL", raising=False)
    (_, _, end_a), (_, start_b, _) = _exclusive(None, tmp_path)
    assert start_b >= end_a
    assert (tmp_path / "locks" / "registry-skf-lock-test.lock").exists()


@pytest.mark.postgres
def test_postgres_advisory_lock_excludes_a_second_holder(postgres_url: str, tmp_path: Path) -> None:
    (_, _, end_a), (_, start_b, _) = _exclusive(postgres_url, tmp_path)
    assert start_b >= end_a
    assert not os.path.exists(tmp_path / "locks")
