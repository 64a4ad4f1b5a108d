"""Offline weights: status, verified sync from a folder or S3 into the torch/pyiqa caches, and the CLI."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from components import weights
from components.storage import IntegrityError, open_storage
from flows.cli import main as cli_main
from flows.commands import weights as weights_cli

NIQE = "niqe_modelparameters.mat"
HRNET = "hrnet_w48_pascal_context_cls59_480x480.pth"


@pytest.fixture(autouse=True)
def _store_only(unbundled: Path) -> None:
    """These tests exercise the cache and the store; the bundled NIQE copy has its own test below."""


def _niqe_source() -> Path:
    source = Path(weights.__file__).parent / "evaluation" / "assets" / NIQE  # real copy; bundle hidden
    assert source.is_file(), f"{source} is missing: it ships with the package"
    return source


def _by_name(rows: list[weights.WeightStatus]) -> dict[str, weights.WeightStatus]:
    return {r.name: r for r in rows}


def test_known_weights_and_cache_paths_follow_torch_home(weights_dirs: dict[str, Path]) -> None:
    names = {s.name for s in weights.KNOWN_WEIGHTS}
    assert {NIQE, "LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth", HRNET} <= names
    hub = weights_dirs["torch_home"] / "hub"
    assert weights.cache_path(NIQE) == hub / "pyiqa" / NIQE
    assert weights.cache_path("alexnet-owt-7be5be79.pth") == hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    for name in (NIQE, "LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth"):
        digest = weights.get_spec(name).sha256
        assert digest and len(digest) == 64, name  # full published digests, never a name prefix
    assert weights.get_spec(HRNET).sha256 is None  # no published digest: the operator must pin it


def test_status_then_sync_from_a_folder(weights_dirs: dict[str, Path]) -> None:
    before = _by_name(weights.weights_status())
    assert not before[NIQE].present and before[NIQE].path is None
    assert before[NIQE].looked_in == (str(weights.cache_path(NIQE)), str(weights_dirs["store"] / NIQE))
    shutil.copy(_niqe_source(), weights_dirs["store"] / NIQE)
    in_store = _by_name(weights.weights_status())[NIQE]
    assert in_store.present and in_store.path == str(weights_dirs["store"] / NIQE)
    synced = _by_name(weights.sync_weights())
    assert synced[NIQE].note == "synced" and not synced[HRNET].present
    after = _by_name(weights.weights_status())[NIQE]
    assert after.path == str(weights.cache_path(NIQE))
    assert (
        after.sha256
        == weights.get_spec(NIQE).sha256
        == hashlib.sha256(_niqe_source().read_bytes()).hexdigest()
    )
    assert _by_name(weights.sync_weights())[NIQE].note == "already cached"


def test_sync_rejects_corrupt_files_and_leaves_no_copy(weights_dirs: dict[str, Path]) -> None:
    (weights_dirs["store"] / NIQE).write_bytes(b"not the published NIQE parameters")
    with pytest.raises(IntegrityError):
        weights.sync_weights(names=[NIQE])
    assert not weights.cache_path(NIQE).exists()
    alexnet = "alexnet-owt-7be5be79.pth"
    (weights_dirs["store"] / alexnet).write_bytes(b"random bytes")
    with pytest.raises(IntegrityError, match="7be5be79"):
        weights.sync_weights(names=[alexnet])
    assert not weights.cache_path(alexnet).exists()


def test_sha256_sidecar_is_not_trusted_and_unpinned_files_are_refused(weights_dirs: dict[str, Path]) -> None:
    data = b"pretend HRNet checkpoint"
    (weights_dirs["store"] / HRNET).write_bytes(data)
    (weights_dirs["store"] / f"{HRNET}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    with pytest.raises(weights.UnpinnedWeightError, match="no sha256 is pinned"):
        weights.sync_weights(names=[HRNET])
    assert not weights.cache_path(HRNET).exists()
    with pytest.raises(IntegrityError, match="not the pinned"):
        weights.sync_weights(names=[HRNET], pins={HRNET: "0" * 64})
    assert not weights.cache_path(HRNET).exists()
    (row,) = weights.sync_weights(names=[HRNET], pins={HRNET: hashlib.sha256(data).hexdigest()})
    assert row.note == "synced" and weights.cache_path(HRNET).read_bytes() == data


def test_ensure_local_copies_on_demand(weights_dirs: dict[str, Path]) -> None:
    path, looked = weights.ensure_local(NIQE)
    assert path is None and str(weights_dirs["store"] / NIQE) in looked
    shutil.copy(_niqe_source(), weights_dirs["store"] / NIQE)
    path, _ = weights.ensure_local(NIQE)
    assert path == weights.cache_path(NIQE) and path.read_bytes() == _niqe_source().read_bytes()


def test_sync_from_s3(weights_dirs: dict[str, Path], s3_env: str) -> None:
    uri = f"s3://{s3_env}/weights"
    open_storage(uri).put_file(NIQE, _niqe_source())
    remote = _by_name(weights.weights_status(uri))[NIQE]
    assert remote.present and remote.path == f"{uri}/{NIQE}" and remote.sha256 is None
    synced = _by_name(weights.sync_weights(uri))[NIQE]
    assert synced.path == str(weights.cache_path(NIQE)) and synced.sha256 == weights.get_spec(NIQE).sha256


def test_cli_status_before_and_after_sync(weights_dirs: dict[str, Path]) -> None:
    app = typer.Typer()
    weights_cli.register(app)
    runner = CliRunner()

    def niqe_line(args: list[str]) -> str:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if "niqe_modelparam" in line]
        assert lines, result.output
        return lines[0]

    assert "│ no " in niqe_line(["weights", "status"])
    shutil.copy(_niqe_source(), weights_dirs["store"] / NIQE)
    assert "synced" in niqe_line(["weights", "sync", "--source", str(weights_dirs["store"])])
    status = niqe_line(["weights", "status"])
    assert "│ yes " in status and weights.get_spec(NIQE).sha256[:16] in status


def test_cli_sync_reports_integrity_errors(
    weights_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (weights_dirs["store"] / NIQE).write_bytes(b"corrupt")
    with pytest.raises(SystemExit) as exited:
        cli_main(["weights", "sync"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(weights_dirs["store"] / NIQE) in err
