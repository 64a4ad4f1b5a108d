"""precompute_priors, its Prefect flow and CLI: batching by size, cache hits, recovery, failures, S3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from components import registry
from components.catalog import open_catalog
from components.data.ingest import get_version, ingest
from components.data.torch_dataset import load_rgb
from components.precompute import PrecomputeSummary, precompute_priors
from components.prior_cache import PriorCache
from components.settings import get_settings
from components.storage import open_storage
from tests.priors_fixtures import SMALL_SKB, CountingSKB, write_lol

TRAIN_SIZES = [(64, 96), (64, 96), (64, 96)]
TEST_SIZES = [(48, 64)]


@pytest.fixture(scope="module")
def small_skb() -> object:
    return registry.create(SMALL_SKB, device="cpu")


@pytest.fixture()
def dataset(skf_home: Path, tmp_path: Path) -> str:
    """A tiny LOL dataset (3 train pairs 64x96, 1 test pair 48x64) ingested into the private SKF_HOME."""
    return ingest(str(write_lol(tmp_path / "lol", TRAIN_SIZES, TEST_SIZES)), name="tiny").ref


def _cache(fingerprint: str) -> PriorCache:
    settings = get_settings()
    return PriorCache(open_storage(settings.storage_uri), open_catalog(settings.catalog_url), fingerprint)


def test_first_run_computes_in_size_batches_second_run_is_all_hits(dataset: str, small_skb: object) -> None:
    skb = CountingSKB(small_skb)
    progress: list[tuple[int, int]] = []
    first = precompute_priors(dataset, skb=skb, batch_size=2, progress=lambda d, t: progress.append((d, t)))

    assert (first.computed, first.cached, first.failed, first.total) == (4, 0, 0, 4)
    # 3 images of 64x96 in batches of <= 2, the 48x64 one alone: sizes never mix in a batch.
    assert sorted(skb.calls) == [(1, 3, 48, 64), (1, 3, 64, 96), (2, 3, 64, 96)]
    assert first.forward_passes == 3 and first.pretrained is False
    assert first.fingerprint == small_skb.fingerprint and first.skb_spec_resolved == SMALL_SKB
    assert first.bytes_written > 0 and first.images_per_s > 0
    assert progress[-1] == (4, 4)

    skb.calls.clear()
    second = precompute_priors(dataset, skb=skb, batch_size=2)
    assert (second.computed, second.cached, second.failed) == (0, 4, 0)
    assert skb.calls == [] and second.forward_passes == 0 and second.bytes_written == 0


def test_cached_priors_equal_a_direct_forward(dataset: str, small_skb: object) -> None:
    precompute_priors(dataset, skb=small_skb, batch_size=4)
    version = get_version(dataset)
    low = [r for r in version.images if r.role == "low"]
    assert len(low) == 4
    cache = _cache(small_skb.fingerprint)
    for record in low[:2]:
        image = torch.from_numpy(load_rgb(record).copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
        direct = small_skb(image).half()
        cached = cache.get(record.sha256)
        for a, b in zip(
            (cached.f0, cached.f2, cached.logits), (direct.f0, direct.f2, direct.logits), strict=True
        ):
            assert a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=1e-2)


def test_only_requested_splits_and_low_images(dataset: str, small_skb: object) -> None:
    skb = CountingSKB(small_skb)
    summary = precompute_priors(dataset, skb=skb, splits=("test",))
    assert (summary.total, summary.computed) == (1, 1) and skb.calls == [(1, 3, 48, 64)]
    high = {r.sha256 for r in get_version(dataset).images if r.role == "high"}
    assert _cache(small_skb.fingerprint).cached(high) == set()


def test_corrupt_entries_are_recomputed(dataset: str, small_skb: object) -> None:
    precompute_priors(dataset, skb=small_skb)
    cache = _cache(small_skb.fingerprint)
    low = sorted(r.sha256 for r in get_version(dataset).images if r.role == "low")
    flipped, truncated = (Path(cache.storage.uri_for(cache.key(s))) for s in low[:2])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x55
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:1000])

    skb = CountingSKB(small_skb)
    again = precompute_priors(dataset, skb=skb)
    assert (again.computed, again.cached, again.corrupt, again.failed) == (2, 2, 2, 0)
    assert skb.images == 2
    assert all(cache.get(s) is not None for s in low)


def test_failures_are_counted_per_image_without_stopping_the_rest(dataset: str, small_skb: object) -> None:
    version = get_version(dataset)
    victim = next(r for r in version.images if r.role == "low" and r.split == "train")
    Path(victim.uri).unlink()  # one stored image vanished
    skb = CountingSKB(small_skb, fail_on_size=(48, 64))  # and the SKB fails on the test image's size

    summary = precompute_priors(dataset, skb=skb, batch_size=4)
    assert (summary.computed, summary.failed, summary.total) == (2, 2, 4)
    assert "FileNotFoundError" in summary.errors[victim.sha256]
    assert any("simulated SKB failure" in msg for msg in summary.errors.values())
    assert "## Failures" in summary.to_markdown()


@pytest.mark.s3
def test_everything_on_s3(
    s3_env: str, skf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKF_STORAGE_URI", f"s3://{s3_env}/skf")
    ref = ingest(str(write_lol(tmp_path / "lol", TRAIN_SIZES[:1], TEST_SIZES)), name="s3set").ref
    skb = CountingSKB(registry.create(SMALL_SKB, device="cpu"))
    first = precompute_priors(ref, skb=skb)
    assert (first.computed, first.failed) == (2, 0)
    cache = _cache(skb.fingerprint)
    sha = next(r.sha256 for r in get_version(ref).images if r.role == "low")
    assert cache.get(sha) is not None and cache.key(sha) in set(cache.storage.list("priors/"))
    skb.calls.clear()
    assert precompute_priors(ref, skb=skb).cached == 2 and skb.calls == []


def test_flow_publishes_a_summary(prefect_harness: None, dataset: str) -> None:
    from prefect.artifacts import Artifact

    from flows.precompute import precompute_priors_flow

    result = precompute_priors_flow(dataset, skb_spec="skb/hrnet-w18-small-test", batch_size=4)
    assert (result["computed"], result["failed"], result["skb_spec_resolved"]) == (4, 0, SMALL_SKB)
    artifact = Artifact.get("priors-tiny-1")
    assert artifact is not None and "| computed | 4 |" in artifact.data

    state = precompute_priors_flow(dataset, skb_spec="skb/no-such-skb", return_state=True)
    assert state.is_failed()
    with pytest.raises(registry.UnknownComponentError, match="hrnet-w18-small-test"):
        state.result()


def test_cli_reports_progress_and_summary(dataset: str, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main as cli_main
    from flows.commands import priors

    app = typer.Typer()
    priors.register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer in multi-command mode
    runner = CliRunner()
    first = runner.invoke(app, ["precompute", dataset, "--skb", SMALL_SKB, "--batch-size", "2"])
    assert first.exit_code == 0, first.output
    assert "computed" in first.output and "random" in first.output
    second = runner.invoke(app, ["precompute", dataset, "--skb", SMALL_SKB])
    assert second.exit_code == 0 and "cached (skipped)" in second.output

    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:  # through the CLI's error boundary: one line on stderr
        cli_main(["precompute", "nope@1", "--skb", SMALL_SKB])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and err.startswith("error: no dataset named 'nope'") and err.count("\n") == 1


def test_summary_rows_cover_every_count() -> None:
    s = PrecomputeSummary(
        1, 2, 3, 4.0, 0.25, 10, "f" * 64, SMALL_SKB, False, "x@1", 6, 1, 1, {"a" * 64: "boom"}
    )
    keys = dict(s.rows())
    assert keys["computed"] == "1" and keys["failed"] == "3" and keys["pretrained"].startswith("NO")
    assert s.as_dict()["errors"] == {"a" * 64: "boom"}
