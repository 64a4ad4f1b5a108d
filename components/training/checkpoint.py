"""Atomic checkpoint files: ``step-XXXXXXXX.pt`` snapshots, a ``latest.pt`` pointer, keep-last-k rotation.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over
the target, so a crash mid-write never leaves a truncated ``latest.pt``: readers see the old file or
the new one. Everything stored is plain data (tensors, numbers, strings, lists, dicts) so that
``torch.load(weights_only=True)`` can read it without executing pickled code.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from components.errors import SKFError

log = logging.getLogger(__name__)

LATEST = "latest.pt"
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
FORMAT_VERSION = 1


class CheckpointError(SKFError, RuntimeError):
    """A checkpoint file is missing, unreadable or not one of ours."""


def step_filename(step: int) -> str:
    return f"step-{step:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through temp + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_link_or_copy(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s content atomically (hard link when possible, else copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


class CheckpointManager:
    """Writes, rotates and finds checkpoints under one directory."""

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    @property
    def latest_path(self) -> Path:
        return self.directory / LATEST

    def steps(self) -> list[int]:
        """Steps with a snapshot on disk, ascending."""
        if not self.directory.is_dir():
            return []
        found = (_STEP_RE.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        """Write ``step-XXXXXXXX.pt``, repoint ``latest.pt`` to it, then drop snapshots beyond keep-last-k."""
        path = self.directory / step_filename(step)
        atomic_torch_save(dict(state), path)
        _atomic_link_or_copy(path, self.latest_path)
        for old in self.steps()[: -self.keep_last]:
            (self.directory / step_filename(old)).unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        return self.latest_path if self.latest_path.is_file() else None

    def repoint_latest(self) -> Path | None:
        """Point ``latest.pt`` at the newest snapshot on disk (after snapshots arrived from elsewhere)."""
        steps = self.steps()
        if not steps:
            return None
        _atomic_link_or_copy(self.directory / step_filename(steps[-1]), self.latest_path)
        return self.latest_path

    def _candidates(self) -> list[Path]:
        """``latest.pt``, then the snapshots newest first, each file once (``latest.pt`` is a hard link)."""
        paths = [self.latest_path] if self.latest_path.is_file() else []
        for step in reversed(self.steps()):
            path = self.directory / step_filename(step)
            if not any(_same_file(path, seen) for seen in paths):
                paths.append(path)
        return paths

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, with its state; None when there is none to resume from.

        A damaged ``latest.pt`` (a truncated copy, a disk error) falls back to the newest intact
        ``step-*.pt`` with a warning, so a resume loses at most ``ckpt_every`` steps instead of failing.
        """
        damaged: list[str] = []
        for path in self._candidates():
            try:
                state = load_training_state(path, map_location=map_location)
            except CheckpointError as exc:
                damaged.append(f"{path.name} ({str(exc).splitlines()[0]})")
                continue
            if damaged:
                message = f"resuming from {path}: newer checkpoint(s) are damaged: {'; '.join(damaged)}"
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            return path, state
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} ({'; '.join(damaged)}); delete that folder to "
                "train from scratch"
            )
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_training_state(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :class:`CheckpointManager` with the safe (weights-only) unpickler."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file or foreign pickle content
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load checkpoint {path} with weights_only=True: {detail}. If it is truncated, resume "
            f"from an older step-*.pt in {path.parent}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a training checkpoint of format {FORMAT_VERSION} (got format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__})"
        )
    return state
