"""Weight files cannot run code: full-digest pins, no trust in the store, and no library unpickling.

A malicious pickle (its ``__reduce__`` creates a marker file) is planted where the pipeline looks for the
AlexNet backbone of LPIPS: in the weights store under its published name, with a ``.sha256`` sidecar that
vouches for it, with a digest sharing the pin's first hex digits, and straight in the torch hub cache.
`skf weights sync` and the LPIPS build must refuse it, name it, exit non-zero, keep the cache clean and
never run it. The real files are not available offline, so success paths pin test-made files instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
from pathlib import Path

import pytest
import torch

from components import weights
from components.checkpoints import ChecksumMismatchError
from components.evaluation import evaluate_pairs, pyiqa_backend
from components.evaluation.metrics import METRICS
from components.registry import create
from flows.cli import main as cli_main
from models.hrnet import HRNet, hrnet_w18_small_config

ALEXNET = "alexnet-owt-7be5be79.pth"
LINS = "LPIPS_v0.1_alex-df73285e.pth"
HRNET = "hrnet_w48_pascal_context_cls59_480x480.pth"


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for a weight file that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture()
def evil(marker: Path) -> bytes:
    """A 60-odd byte pickle that torchvision's ``torch.load(weights_only=False)`` would execute."""
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data)  # the payload is live: unpickling really creates the marker
    assert marker.exists()
    marker.unlink()
    return data


@pytest.fixture(autouse=True)
def _fresh_metric_cache(monkeypatch: pytest.MonkeyPatch, unbundled: Path) -> None:
    """No scorer built by another test, and only the store and cache as sources (the bundle hidden)."""
    monkeypatch.setattr(pyiqa_backend, "_built", {})


def _pin(monkeypatch: pytest.MonkeyPatch, digests: dict[str, str]) -> None:
    """Replace code pins (only the real files match the published ones) with test digests."""
    pinned = tuple(
        dataclasses.replace(s, sha256=digests.get(s.name, s.sha256)) for s in weights.KNOWN_WEIGHTS
    )
    monkeypatch.setattr(weights, "KNOWN_WEIGHTS", pinned)


def _state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _random_lpips_files(seed: int = 0) -> dict[str, bytes]:
    """A random AlexNet and random LPIPS layers in the published files' key layouts."""
    from torchvision.models import alexnet

    torch.manual_seed(seed)
    alex = alexnet().state_dict()
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    return {ALEXNET: _state_bytes(alex), LINS: _state_bytes(lins)}


def _sync(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `skf weights ...` through the CLI's error boundary: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        cli_main(["weights", *args])
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def _cache_files() -> list[Path]:
    hub = weights.torch_hub_dir()
    return sorted(p for p in hub.rglob("*") if p.is_file()) if hub.exists() else []


# ------------------------------------------------------------------------------------ refused from the store
def test_malicious_file_in_the_store_is_refused_by_sync(
    weights_dirs: dict[str, Path], evil: bytes, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (weights_dirs["store"] / ALEXNET).write_bytes(evil)
    code, _, err = _sync(["sync"], capsys)
    assert code != 0 and err.startswith("error: ")
    assert str(weights_dirs["store"] / ALEXNET) in err
    assert hashlib.sha256(evil).hexdigest() in err and weights.get_spec(ALEXNET).sha256 in err
    assert _cache_files() == [] and not marker.exists()


def test_sharing_the_pins_leading_digits_does_not_help(
    weights_dirs: dict[str, Path], evil: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the old name-prefix check accepted: a file whose digest starts like the expected one."""
    actual = hashlib.sha256(evil).hexdigest()
    _pin(monkeypatch, {ALEXNET: actual[:8] + ("0" if actual[8] != "0" else "1") + actual[9:]})
    (weights_dirs["store"] / ALEXNET).write_bytes(evil)
    with pytest.raises(weights.WeightIntegrityError, match="not the pinned"):
        weights.sync_weights(names=[ALEXNET])
    assert _cache_files() == []


def test_a_sidecar_in_the_store_vouches_for_nothing(
    weights_dirs: dict[str, Path], evil: bytes, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = weights_dirs["store"]
    for name in (ALEXNET, HRNET):
        (store / name).write_bytes(evil)
        (store / f"{name}.sha256").write_text(f"{hashlib.sha256(evil).hexdigest()}  {name}\n")
    code, out, err = _sync(["sync"], capsys)
    assert code != 0 and str(store / ALEXNET) in err
    assert f"{HRNET}: no sha256 is pinned" in err and "--sha256" in err
    assert "REFUSED" in out  # the table still shows every file
    assert _cache_files() == [] and not marker.exists()


def test_malicious_file_in_the_store_never_reaches_lpips(
    weights_dirs: dict[str, Path], evil: bytes, marker: Path
) -> None:
    (weights_dirs["store"] / ALEXNET).write_bytes(evil)
    img = torch.rand(1, 3, 32, 32)
    report = evaluate_pairs(img, img, "raw", ("psnr", "lpips"), device="cpu")
    assert "lpips" in report.unavailable and report.aggregates["psnr"] is not None
    assert not marker.exists() and _cache_files() == []


# ------------------------------------------------------------------------------------ refused from the cache
def test_malicious_file_in_the_cache_is_refused_and_removed(
    weights_dirs: dict[str, Path], evil: bytes, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _random_lpips_files()
    _pin(monkeypatch, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    weights.cache_path(LINS).parent.mkdir(parents=True)
    weights.cache_path(LINS).write_bytes(files[LINS])
    planted = weights.cache_path(ALEXNET)
    planted.parent.mkdir(parents=True)
    planted.write_bytes(evil)
    img = torch.rand(1, 3, 32, 32)
    report = evaluate_pairs(img, img, "raw", ("lpips",), device="cpu")
    reason = report.unavailable["lpips"].reason
    assert str(planted) in reason and "removed from the cache" in reason
    assert not marker.exists() and not planted.exists()


def test_sync_cleans_a_bad_cached_file_and_fails(
    weights_dirs: dict[str, Path], evil: bytes, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = weights.cache_path(ALEXNET)
    planted.parent.mkdir(parents=True)
    planted.write_bytes(evil)
    code, _, err = _sync(["sync"], capsys)
    assert code != 0 and str(planted) in err and "removed from the cache" in err
    assert not planted.exists() and not marker.exists()


def test_a_good_copy_in_the_store_replaces_a_bad_cached_one(
    weights_dirs: dict[str, Path], evil: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _random_lpips_files()[ALEXNET]
    _pin(monkeypatch, {ALEXNET: hashlib.sha256(good).hexdigest()})
    weights.cache_path(ALEXNET).parent.mkdir(parents=True)
    weights.cache_path(ALEXNET).write_bytes(evil)
    (weights_dirs["store"] / ALEXNET).write_bytes(good)
    (row,) = weights.sync_weights(names=[ALEXNET])
    assert row.note.startswith("synced (replaced") and weights.cache_path(ALEXNET).read_bytes() == good


# ------------------------------------------------------------------------------------ LPIPS without unpickling
def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make any torch.load without weights_only=True, or any torchvision/hub fetch, fail the test."""
    real_load, seen = torch.load, []

    def guarded_load(*args: object, **kwargs: object) -> object:
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {kwargs}"
        seen.append(True)
        return real_load(*args, **kwargs)

    def no_fetch(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a library tried to load weights itself: {args}")

    monkeypatch.setattr(torch, "load", guarded_load)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_fetch)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_fetch)
    return seen


def test_lpips_build_loads_weights_only(
    weights_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _random_lpips_files()
    _pin(monkeypatch, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    for name, data in files.items():
        (weights_dirs["store"] / name).write_bytes(data)
    seen = _no_unpickling(monkeypatch)
    score = pyiqa_backend.build(METRICS["lpips"], torch.device("cpu"))
    assert len(seen) == 2  # the two verified files, decoded by us
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.isfinite(score(a, b)).all() and (score(a, b) > 0).all()


def test_lpips_numerics_equal_pyiqas_own_build(
    weights_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same files, built the ordinary way (pyiqa + torchvision load them) vs our verified path."""
    import pyiqa

    files = _random_lpips_files(seed=7)
    _pin(monkeypatch, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    for name, data in files.items():
        weights.cache_path(name).parent.mkdir(parents=True, exist_ok=True)
        weights.cache_path(name).write_bytes(data)  # test-made, so the ordinary load is harmless here
    reference = pyiqa.create_metric(
        "lpips", device="cpu", net="alex", version="0.1", pretrained_model_path=str(weights.cache_path(LINS))
    )
    ours = pyiqa_backend.build(METRICS["lpips"], torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 3, 64, 48, generator=g), torch.rand(3, 3, 64, 48, generator=g)
    with torch.no_grad():
        expected = reference(a, b).reshape(-1)
    assert torch.equal(ours(a, b), expected)


# ------------------------------------------------------------------------------------ success paths and pins
def test_pinned_test_file_syncs(
    weights_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _random_lpips_files()[ALEXNET]
    _pin(monkeypatch, {ALEXNET: hashlib.sha256(good).hexdigest()})
    (weights_dirs["store"] / ALEXNET).write_bytes(good)
    code, out, _ = _sync(["sync"], capsys)
    assert code == 0 and "synced" in out
    assert weights.cache_path(ALEXNET).read_bytes() == good


def test_operator_pins_the_hrnet_checkpoint(
    weights_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = b"stand-in HRNet checkpoint"
    digest = hashlib.sha256(data).hexdigest()
    (weights_dirs["store"] / HRNET).write_bytes(data)
    code, _, err = _sync(["sync", "--sha256", f"{HRNET}={'0' * 64}"], capsys)
    assert code != 0 and "not the pinned" in err and not weights.cache_path(HRNET).exists()
    code, _, err = _sync(["sync", "--sha256", f"{HRNET}=abc"], capsys)
    assert code == 2 and "--sha256" in err
    code, _, err = _sync(["sync", "--sha256", f"{ALEXNET}={digest}"], capsys)
    assert code == 2 and "contradicts the published sha256" in err
    monkeypatch.setenv(weights.PIN_ENV, f"{HRNET}={digest}")
    code, out, _ = _sync(["sync"], capsys)
    assert code == 0 and weights.cache_path(HRNET).read_bytes() == data


def test_skb_checkpoint_is_checked_against_the_operator_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = HRNet(hrnet_w18_small_config())
    path = tmp_path / HRNET
    torch.save(net.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv(weights.PIN_ENV, f"{HRNET}={'1' * 64}")
    with pytest.raises(ChecksumMismatchError, match=str(path)):
        create("skb/hrnet-w18-small-test@1", checkpoint=str(path), device="cpu")
    monkeypatch.setenv(weights.PIN_ENV, f"{HRNET}={digest}")
    loaded = create("skb/hrnet-w18-small-test@1", checkpoint=str(path), device="cpu")
    assert loaded.weights_id == f"sha256:{digest}"  # recorded, so it is part of the SKB fingerprint


# ------------------------------------------------------------------------------------ store errors
def test_sync_from_a_missing_folder_fails(
    tmp_path: Path, skf_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-weights"
    code, _, err = _sync(["sync", "--source", str(missing)], capsys)
    assert code != 0 and f"weights folder {missing} does not exist" in err


def test_status_of_an_unusable_bucket_reports_instead_of_crashing(
    weights_dirs: dict[str, Path], s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _sync(["status", "--source", "s3://no-such-bucket-skf/weights"], capsys)
    assert (
        code == 0 and "cannot read the weights store" in out and "no-such-bucket-skf' does not exist" in out
    )
    # Botocore's message for an invalid name holds a regex full of brackets: shown as text, not markup.
    code, out, _ = _sync(["status", "--source", "s3://Bad_Bucket!/weights"], capsys)
    assert code == 0 and "Invalid bucket name" in out
    code, _, err = _sync(["sync", "--source", "s3://no-such-bucket-skf/weights"], capsys)
    assert code != 0 and err.startswith("error: cannot read the weights store s3://no-such-bucket-skf")
