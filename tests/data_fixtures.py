"""Helpers for data-plane tests: tiny deterministic PNGs and dataset trees in each supported layout."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A small RGB PNG (height, width) whose content depends on ``seed`` only."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(seed, size))
    return path


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb as far as Pillow is concerned)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def make_lol(
    root: Path, train: int = 3, test: int = 2, size: tuple[int, int] = (32, 32), seed: int = 0
) -> Path:
    """``our485/{low,high}`` and ``eval15/{low,high}`` with identical names (LOL)."""
    for subset, n, offset in (("our485", train, 0), ("eval15", test, 100)):
        for i in range(n):
            name = f"{offset + i + 1}.png"
            write_png(root / subset / "low" / name, seed * 1000 + 2 * (offset + i), size)
            write_png(root / subset / "high" / name, seed * 1000 + 2 * (offset + i) + 1, size)
    return root


def make_lol_v2(root: Path, subset: str = "Real_captured", train: int = 3, test: int = 2) -> Path:
    """LOL-v2: Train/{Low,Normal} with low*/normal* names, Test/{low,high} (lowercase, as distributed)."""
    for split_dir, low_dir, high_dir, n, offset in (
        ("Train", "Low", "Normal", train, 0),
        ("Test", "low", "high", test, 690),
    ):
        for i in range(n):
            k = offset + i + 1
            seed = 5000 + 2 * k + (0 if subset == "Real_captured" else 50_000)
            write_png(root / subset / split_dir / low_dir / f"low{k:05d}.png", seed)
            write_png(root / subset / split_dir / high_dir / f"normal{k:05d}.png", seed + 1)
    return root


def lose_catalog(db_url: str) -> None:
    """Delete a catalog behind the application's back: the SQLite file, or every table on the server."""
    import sqlalchemy as sa

    url = sa.engine.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(url.database + suffix).unlink(missing_ok=True)
        return
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for table in sa.inspect(conn).get_table_names():
                conn.execute(sa.text(f'DROP TABLE "{table}" CASCADE'))
    finally:
        engine.dispose()
