"""Released parameter layouts (``tests/data/*_keys/*.tsv``): read them, and say where ours differs.

Each TSV lists ``key<TAB>shape<TAB>numel`` (shape as ``AxBxC``), with ``#`` comment lines and a header.
"""

from __future__ import annotations

from pathlib import Path

Shape = tuple[int, ...]

__all__ = ["Shape", "mapping_diff", "read_key_table"]


def read_key_table(path: Path) -> dict[str, tuple[Shape, int]]:
    """``key -> (shape, numel)`` from the TSV at ``path``, in file order (comment and header lines skipped)."""
    table: dict[str, tuple[Shape, int]] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape, numel = line.split("\t")
        assert key not in table, f"duplicate key {key} in {path.name}"
        table[key] = (tuple(int(d) for d in shape.split("x")), int(numel))
    return table


def mapping_diff(ours: dict[str, Shape], released: dict[str, Shape], limit: int = 15) -> str:
    """A readable account of where two key->shape mappings differ (empty when equal)."""
    lines = []
    for label, keys in (
        ("missing in ours", sorted(released.keys() - ours.keys())),
        ("extra in ours", sorted(ours.keys() - released.keys())),
    ):
        if keys:
            lines.append(f"{len(keys)} {label}: " + ", ".join(keys[:limit]))
    wrong = sorted(k for k in ours.keys() & released.keys() if ours[k] != released[k])
    if wrong:
        shown = ", ".join(f"{k} ours {ours[k]} released {released[k]}" for k in wrong[:limit])
        lines.append(f"{len(wrong)} with another shape: {shown}")
    return "\n".join(lines)
