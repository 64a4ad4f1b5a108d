"""Prior cache: canonical safetensors entries, verified reads, corruption recovery, S3, races, crop alignment."""

from __future__ import annotations

import hashlib
import itertools
import pickle
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from components.catalog import Catalog, PriorCacheEntry, open_catalog
from components.data.records import ImageRecord
from components.data.torch_dataset import PairedImageDataset, apply_geometry
from components.prior_cache import (
    CorruptEntryError,
    MissingPriorsError,
    PriorCache,
    PriorsLoader,
    crop_priors,
    decode_priors,
    encode_priors,
    prior_elements,
    prior_key,
)
from components.skb import Priors
from components.storage import Storage, open_storage, sha256_bytes
from tests.priors_fixtures import CoordinateSKB, coordinate_image

FP = "ab12" * 16  # a 64-char fingerprint, like the SKB's


def sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def random_priors(h: int, w: int, seed: int = 0, channels: tuple[int, ...] = (3, 4, 5, 6)) -> Priors:
    g = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(1, c, -(-h // s), -(-w // s), generator=g)
        for c, s in zip(channels, (4, 8, 16, 4), strict=True)
    ]
    return Priors(*maps)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Catalog:
    if request.param == "sqlite":
        return open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    return open_catalog(request.getfixturevalue("postgres_url"))


@pytest.fixture()
def cache(tmp_path: Path, catalog: Catalog) -> PriorCache:
    return PriorCache(open_storage(tmp_path / "store"), catalog, FP)


def rows(catalog: Catalog) -> list[PriorCacheEntry]:
    with catalog.session() as s:
        return list(s.scalars(sa.select(PriorCacheEntry)))


# --------------------------------------------------------------------------------------------- format
def test_round_trip_layout_and_catalog(cache: PriorCache) -> None:
    priors = random_priors(72, 100)
    entry = cache.put(sha("a"), priors, image_size=(72, 100))
    assert entry.created
    key = prior_key(FP, sha("a"))
    assert key == f"priors/{FP[:16]}/{sha('a')[:2]}/{sha('a')}.safetensors"
    data = cache.storage.get_bytes(key)
    (row,) = rows(cache.catalog)
    assert (row.image_sha256, row.fingerprint, row.sha256, row.nbytes) == (
        sha("a"),
        FP,
        sha256_bytes(data),
        len(data),
    )
    assert row.uri == cache.storage.uri_for(key) == entry.uri

    got = cache.get(sha("a"))
    assert got is not None and cache.stats.hits == 1
    for name in ("f0", "f1", "f2", "logits"):
        stored, original = getattr(got, name), getattr(priors, name)
        assert stored.dtype == torch.float16 and stored.shape == original.shape
        assert torch.equal(stored, original.half())
    assert cache.get(sha("b")) is None and cache.stats.misses == 1


def test_file_is_standard_safetensors_with_metadata(cache: PriorCache, tmp_path: Path) -> None:
    cache.put(sha("a"), random_priors(72, 100), image_size=(72, 100))
    path = Path(cache.storage.uri_for(prior_key(FP, sha("a"))))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["f0", "f1", "f2", "logits"]
        assert f.get_tensor("f1").shape == (4, 9, 13)
    assert meta["fingerprint"] == FP and meta["image_sha256"] == sha("a")
    assert (meta["height"], meta["width"]) == ("72", "100")
    assert '"f2":[5,5,7]' in meta["shapes"]
    assert set(st_load(path.read_bytes())) == {"f0", "f1", "f2", "logits"}


def test_encoding_is_deterministic() -> None:
    """Concurrent writers rely on equal priors giving byte-identical files."""
    p = random_priors(40, 56, seed=3)
    a = encode_priors(sha("a"), FP, (40, 56), p)
    b = encode_priors(sha("a"), FP, (40, 56), Priors(*(t.clone() for t in (p.f0, p.f1, p.f2, p.logits))))
    assert a == b
    assert encode_priors(sha("a"), FP, (40, 56), random_priors(40, 56, seed=4)) != a


def test_size_per_image_matches_the_spec() -> None:
    """600x400 with the W48 channels: 2,147,400 elements = 4,294,800 bytes of fp16 (+ a small header)."""
    assert prior_elements((400, 600)) == 2_147_400
    data = encode_priors(sha("a"), FP, (400, 600), random_priors(400, 600, channels=(48, 96, 192, 59)))
    assert 4_294_800 < len(data) < 4_294_800 + 1024


def test_rejects_inconsistent_or_non_finite_priors(cache: PriorCache) -> None:
    with pytest.raises(ValueError, match="expected"):
        cache.put(sha("a"), random_priors(72, 100), image_size=(64, 100))  # grids of another size
    bad = random_priors(32, 32)
    bad.f0[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        cache.put(sha("a"), bad)
    with pytest.raises(ValueError, match="batch size"):
        cache.put(sha("a"), Priors(*(t.expand(2, -1, -1, -1) for t in (bad.f0, bad.f1, bad.f2, bad.logits))))
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.get("not-a-sha")
    assert rows(cache.catalog) == []


def test_decode_checks_metadata() -> None:
    data = encode_priors(sha("a"), FP, (40, 56), random_priors(40, 56))
    decode_priors(data, image_sha256=sha("a"), fingerprint=FP)
    with pytest.raises(CorruptEntryError, match="fingerprint"):
        decode_priors(data, image_sha256=sha("a"), fingerprint="other")
    with pytest.raises(CorruptEntryError, match="image_sha256"):
        decode_priors(data, image_sha256=sha("b"), fingerprint=FP)
    with pytest.raises(CorruptEntryError):
        decode_priors(data[: len(data) // 2], image_sha256=sha("a"), fingerprint=FP)


# --------------------------------------------------------------------------------------------- corruption
def _corrupt(storage: Storage, key: str, how: str) -> None:
    data = bytearray(storage.get_bytes(key))
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) - 100]
    else:  # a valid-looking header for another image, same length as the original
        data = bytearray(encode_priors(sha("zz"), FP, (72, 100), random_priors(72, 100)))
    storage.put_bytes(key, bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "swapped"])
def test_corrupt_entry_is_detected_deleted_and_rewritable(cache: PriorCache, how: str) -> None:
    priors = random_priors(72, 100)
    cache.put(sha("a"), priors, image_size=(72, 100))
    key = cache.key(sha("a"))
    _corrupt(cache.storage, key, how)

    assert cache.get(sha("a")) is None
    assert cache.stats.corrupt == 1 and cache.stats.corrupt_keys == [key]
    assert not cache.storage.exists(key) and rows(cache.catalog) == []
    assert cache.put(sha("a"), priors, image_size=(72, 100)).created
    assert torch.equal(cache.get(sha("a")).f2, priors.f2.half())


def test_row_without_file_is_a_miss_and_put_repairs_it(cache: PriorCache) -> None:
    priors = random_priors(40, 56)
    cache.put(sha("a"), priors)
    cache.storage.delete(cache.key(sha("a")))
    assert cache.put(sha("a"), priors).created  # the stale row is dropped and the entry rewritten
    cache.storage.delete(cache.key(sha("a")))
    assert cache.get(sha("a")) is None and rows(cache.catalog) == []


@pytest.mark.s3
def test_s3_backed_cache(s3_env: str, tmp_path: Path) -> None:
    import boto3

    storage = open_storage(f"s3://{s3_env}/skf")
    cache = PriorCache(storage, open_catalog(f"sqlite:///{tmp_path / 'c.db'}"), FP)
    priors = random_priors(72, 100)
    entry = cache.put(sha("a"), priors, image_size=(72, 100))
    assert entry.uri == f"s3://{s3_env}/skf/priors/{FP[:16]}/{sha('a')[:2]}/{sha('a')}.safetensors"
    assert torch.equal(cache.get(sha("a")).logits, priors.logits.half())
    assert cache.cached([sha("a"), sha("b")]) == {sha("a")}

    # Damage the object behind the store's back: the read is rejected and the entry forgotten.
    s3 = boto3.client("s3")
    key = f"skf/{cache.key(sha('a'))}"
    body = s3.get_object(Bucket=s3_env, Key=key)["Body"].read()
    s3.put_object(Bucket=s3_env, Key=key, Body=body[:-10])
    assert cache.get(sha("a")) is None and cache.stats.corrupt == 1
    assert not storage.exists(cache.key(sha("a")))
    assert cache.put(sha("a"), priors, image_size=(72, 100)).created
    assert cache.get(sha("a")) is not None


# --------------------------------------------------------------------------------------------- concurrency
def test_concurrent_writers_leave_one_row_and_a_valid_file(cache: PriorCache) -> None:
    priors = random_priors(72, 100)
    caches = [PriorCache(cache.storage, cache.catalog, FP) for _ in range(4)]
    barrier = threading.Barrier(len(caches))
    results, errors = [], []

    def write(c: PriorCache) -> None:
        try:
            barrier.wait()
            results.append(c.put(sha("a"), priors, image_size=(72, 100)))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(rows(cache.catalog)) == 1
    assert len({r.sha256 for r in results}) == 1
    assert torch.equal(cache.get(sha("a")).f0, priors.f0.half())


def test_lost_insert_race_keeps_the_first_row(cache: PriorCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the unique-constraint path: another writer indexes the entry between our check and insert."""
    rival = PriorCache(open_storage(cache.storage.root_uri), cache.catalog, FP)
    theirs, ours = random_priors(72, 100, seed=1), random_priors(72, 100, seed=2)
    original_put = cache.storage.put_bytes
    raced = []

    def put_bytes_after_rival(key: str, data: bytes, **kw: object) -> str:
        if not raced:
            raced.append(rival.put(sha("a"), theirs, image_size=(72, 100)))
        return original_put(key, data, **kw)

    monkeypatch.setattr(cache.storage, "put_bytes", put_bytes_after_rival)
    entry = cache.put(sha("a"), ours, image_size=(72, 100))
    assert not entry.created and cache.stats.conflicts == 1
    (row,) = rows(cache.catalog)
    # Our (different) bytes landed last, so the kept row now describes the file that is there.
    assert row.sha256 == entry.sha256 == sha256_bytes(cache.storage.get_bytes(cache.key(sha("a"))))
    assert torch.equal(cache.get(sha("a")).f0, ours.f0.half())


# --------------------------------------------------------------------------------------------- crops
def test_crop_matches_the_datasets_geometry_per_stride() -> None:
    full = random_priors(96, 128, seed=5)
    box, flips = (16, 32, 64, 64), (True, False, True)
    cropped = crop_priors(full, box, flips)
    for name, stride in (("f0", 4), ("f1", 8), ("f2", 16), ("logits", 4)):
        want = apply_geometry(getattr(full, name), box, flips, stride=stride)  # the dataset's own helper
        assert torch.equal(getattr(cropped, name), want), name
    assert cropped.f2.shape[-2:] == (4, 4)


def test_crop_rules() -> None:
    full = random_priors(72, 100)  # grids 18x25, 9x13, 5x7
    whole = crop_priors(full, (0, 0, 72, 100))  # a whole image with sizes off the 16-grid is fine
    assert all(torch.equal(a, b) for a, b in zip((whole.f0, whole.f2), (full.f0, full.f2), strict=True))
    with pytest.raises(ValueError, match="multiples of 16"):
        crop_priors(full, (8, 0, 32, 32))
    with pytest.raises(ValueError, match="grid"):
        crop_priors(full, (48, 0, 32, 32))  # leaves the image
    with pytest.raises(ValueError, match="grid"):
        crop_priors(full, (0, 0, 40, 32))  # unaligned end inside the image


def test_dataset_samples_carry_priors_aligned_with_the_crop(tmp_path: Path) -> None:
    """End to end through PairedImageDataset: every prior cell names the source cell of its pixels."""
    from PIL import Image

    h, w = 96, 128
    store = open_storage(tmp_path / "store")
    records = []
    for role, tag in (("low", 7), ("high", 9)):
        path = tmp_path / f"{role}.png"
        Image.fromarray(coordinate_image(h, w, tag)).save(path)
        digest = sha256_bytes(path.read_bytes())
        uri = store.put_file(f"images/{digest}.png", path)
        records.append(ImageRecord(digest, "train", role, "pair0", uri, w, h))
    cache = PriorCache(store, open_catalog(f"sqlite:///{tmp_path / 'c.db'}"), CoordinateSKB.fingerprint)
    low_tensor = torch.from_numpy(coordinate_image(h, w, 7)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    cache.put(records[0].sha256, CoordinateSKB()(low_tensor), image_size=(h, w))

    loader = pickle.loads(pickle.dumps(PriorsLoader.from_cache(cache)))  # as DataLoader workers get it
    image = torch.from_numpy(coordinate_image(h, w, 7)).permute(2, 0, 1).float()

    # Every crop/flip combination, with the image cut by the dataset's own geometry helper ...
    cases = [((16, 32, 32, 32), flips) for flips in itertools.product([False, True], repeat=3)]
    for box, flips in cases:
        _assert_aligned(apply_geometry(image, box, flips), loader(records[0].sha256, box, flips)["priors"])

    # ... and the samples PairedImageDataset actually yields through its priors_loader hook.
    ds = PairedImageDataset(records, crop=32, augment=True, seed=1, priors_loader=loader)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        sample = ds[0]
        seen.add(tuple(sample["flip"].tolist()))
        _assert_aligned(sample["low"] * 255, sample["priors"])
    assert len(seen) >= 2  # flipped and unflipped samples were both checked


def _assert_aligned(low: torch.Tensor, priors: dict[str, torch.Tensor]) -> None:
    """``low`` holds each output pixel's source (row, col); prior cell (i, j) must name its source cell."""
    src_y, src_x = low[0].round(), low[1].round()
    for name, s in (("f0", 4), ("f1", 8), ("f2", 16), ("logits", 4)):
        p = priors[name]
        assert p.shape == (3, 32 // s, 32 // s) and p.dtype == torch.float32
        centre = slice(s // 2, None, s)
        assert torch.equal(p[0], torch.div(src_y[centre, centre], s, rounding_mode="floor")), name
        assert torch.equal(p[1], torch.div(src_x[centre, centre], s, rounding_mode="floor")), name
        assert torch.all(p[2] == 7)


def test_loader_reports_missing_priors(tmp_path: Path) -> None:
    cache = PriorCache(open_storage(tmp_path / "s"), open_catalog(f"sqlite:///{tmp_path / 'c.db'}"), FP)
    loader = PriorsLoader.from_cache(cache, key=None)
    with pytest.raises(MissingPriorsError, match="skf precompute"):
        loader(sha("a"), (0, 0, 32, 32), (False, False, False))
    cache.put(sha("a"), random_priors(32, 32))
    out = loader(sha("a"), torch.tensor([0, 0, 32, 32]), torch.tensor([True, False, False]))
    assert set(out) == {"f0", "f1", "f2", "logits"} and out["f2"].shape == (5, 2, 2)
