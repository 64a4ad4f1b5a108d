"""PairedImageDataset: aligned augmentation, explicit geometry, hooks, determinism; carve_validation."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from components.data.records import ImageRecord
from components.data.torch_dataset import PairedImageDataset, apply_geometry, carve_validation
from components.storage import IntegrityError, open_storage

H, W = 96, 128


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _store(storage, arr: np.ndarray, split: str, role: str, key: str) -> ImageRecord:
    data = _png(arr)
    sha = hashlib.sha256(data).hexdigest()
    uri = storage.put_bytes(f"images/{sha[:2]}/{sha}.png", data)
    return ImageRecord(sha, split, role, key, uri, arr.shape[1], arr.shape[0], f"{role}/{key}.png")


@pytest.fixture()
def records(tmp_path: Path) -> list[ImageRecord]:
    """Pairs where high == 2 * low exactly (low in [0, 127]), 4 train and 2 test."""
    storage = open_storage(tmp_path / "store")
    out = []
    for i, split in enumerate(["train"] * 4 + ["test"] * 2):
        low = np.random.default_rng(i).integers(0, 128, size=(H, W, 3), dtype=np.uint8)
        out.append(_store(storage, low, split, "low", f"{split}/{i}"))
        out.append(_store(storage, low * 2, split, "high", f"{split}/{i}"))
    return out


def _coords(_sha: str) -> np.ndarray:
    """Per-pixel (row, col) of the full image: any crop/flip/transpose is readable from the result."""
    return np.stack(np.meshgrid(np.arange(H), np.arange(W), indexing="ij"), axis=-1).astype(np.int32)


def _original_low(records: list[ImageRecord], sha: str) -> torch.Tensor:
    rec = next(r for r in records if r.sha256 == sha)
    with Image.open(rec.uri) as img:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_low_high_and_extra_targets_get_the_same_geometry(records) -> None:
    ds = PairedImageDataset(records, crop=64, seed=5, extra_targets={"coord": _coords})
    seen_flips = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            top, left, h, w = s["crop"].tolist()
            assert top % 16 == 0 and left % 16 == 0 and h == w == 64
            assert s["low"].shape == s["high"].shape == (3, 64, 64)
            assert torch.equal(s["high"] * 255, (s["low"] * 255) * 2)  # same pixels, same geometry
            full = torch.from_numpy(_coords("")).permute(2, 0, 1)
            assert torch.equal(s["coord"], apply_geometry(full, s["crop"], s["flip"]))
            assert torch.equal(
                s["low"], apply_geometry(_original_low(records, s["low_sha256"]), s["crop"], s["flip"])
            )
            seen_flips.add(tuple(s["flip"].tolist()))
    assert len(seen_flips) >= 6  # the flips really vary (8 combinations possible)


def test_samples_are_deterministic_and_vary_with_epoch(records) -> None:
    a = PairedImageDataset(records, crop=32, seed=1)
    b = PairedImageDataset(records, crop=32, seed=1)
    assert all(
        torch.equal(a[i]["low"], b[i]["low"]) and torch.equal(a[i]["crop"], b[i]["crop"]) for i in range(4)
    )
    boxes = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        boxes.add((tuple(a[0]["crop"].tolist()), tuple(a[0]["flip"].tolist())))
    assert len(boxes) > 1


def test_rectangular_crops_never_transpose_and_eval_mode_is_centred(records) -> None:
    ds = PairedImageDataset(records, crop=(32, 64), seed=0)
    for epoch in range(8):
        ds.set_epoch(epoch)
        assert all(not ds[i]["flip"][2] and ds[i]["low"].shape == (3, 32, 64) for i in range(len(ds)))
    centre = PairedImageDataset(records, split="test", crop=64, augment=False)
    assert centre[0]["crop"].tolist() == [16, 32, 64, 64] and not centre[0]["flip"].any()
    whole = PairedImageDataset(records, split="test", crop=None, augment=False)
    assert whole[1]["low"].shape == (3, H, W) and whole[1]["key"] == "test/5"


def test_oversized_crop_is_clamped_to_a_multiple_of_32(records) -> None:
    s = PairedImageDataset(records, crop=256, seed=0)[0]
    assert s["crop"].tolist()[2:] == [96, 96] and s["low"].shape == (3, 96, 96)


def test_priors_loader_hook_gets_the_geometry(records) -> None:
    def priors(sha: str, crop: torch.Tensor, flip: torch.Tensor) -> dict[str, torch.Tensor]:
        quarter = torch.arange(H // 4 * W // 4, dtype=torch.float32).reshape(1, H // 4, W // 4)
        return {"prior": apply_geometry(quarter, crop, flip, stride=4)}

    ds = PairedImageDataset(records, crop=64, seed=2, priors_loader=priors)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["prior"].shape == (2, 1, 16, 16)
    assert batch["crop"].shape == (2, 4) and batch["flip"].shape == (2, 3)


def test_corrupted_storage_object_fails_the_hash_check(records) -> None:
    Path(records[0].uri).write_bytes(_png(np.zeros((H, W, 3), np.uint8)))
    with pytest.raises(IntegrityError):
        PairedImageDataset(records, crop=32)[0]


def test_bad_crop_and_empty_split_are_rejected(records) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        PairedImageDataset(records, crop=48)
    with pytest.raises(ValueError, match="no \\(low, high\\) pairs"):
        PairedImageDataset(records, split="val")


def test_carve_validation_takes_whole_train_pairs_only(records) -> None:
    carved = carve_validation(records, 0.5, seed=3)
    assert carved == carve_validation(records, 0.5, seed=3)
    val = {r.pair_key for r in carved if r.split == "val"}
    train = {r.pair_key for r in carved if r.split == "train"}
    assert len(val) == 2 and len(train) == 2 and not val & train
    assert all(k.startswith("train/") for k in val)
    assert sum(r.split == "val" for r in carved) == 4  # low and high of each pair
    assert [r for r in carved if r.split == "test"] == [r for r in records if r.split == "test"]
    assert len(PairedImageDataset(carved, split="val", crop=32)) == 2
    seeds = {
        frozenset(r.pair_key for r in carve_validation(records, 0.25, seed=s) if r.split == "val")
        for s in range(8)
    }
    assert len(seeds) > 1
