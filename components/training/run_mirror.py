"""A training run's resumable state in the shared store, so that any host can resume it.

A run directory lives under one host's ``$SKF_HOME``; a rerun scheduled on another worker would not see it
and would train from step 1 into the same MLflow run. :class:`RunMirror` copies every file a resume needs
(each checkpoint as it is written, each stage's ``done.json``) to ``runs/<config hash>/`` of the storage
URI, and before a run starts fetches whatever is newer there than on this host.

Each copied file is followed by ``<name>.sha256``, its digest: a file counts only once its digest is there
and matches, so a copy cut off half-way (or damaged later) is skipped in favour of the next older one. The
store keeps the same snapshots as the run directory (``keep_last``): older ones are deleted after each copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from components.storage import IntegrityError, Storage, sha256_file
from components.training.checkpoint import CheckpointManager, step_filename

__all__ = ["DIGEST_SUFFIX", "RunMirror", "run_key"]

log = logging.getLogger(__name__)

DIGEST_SUFFIX = ".sha256"
_DONE = "done.json"


def run_key(config_hash: str) -> str:
    """The storage prefix of a run: ``runs/<hash[:16]>``, the name of its local run directory."""
    return f"runs/{config_hash[:16]}"


def _step_of(name: str) -> int | None:
    stem = name.removeprefix("step-").removesuffix(".pt")
    return int(stem) if name.startswith("step-") and name.endswith(".pt") and stem.isdigit() else None


class RunMirror:
    """Copies ``run_dir``'s checkpoints and ``done.json`` files to ``storage`` under ``prefix``, and back."""

    def __init__(self, storage: Storage, run_dir: str | Path, prefix: str) -> None:
        self.storage = storage
        self.run_dir = Path(run_dir)
        self.prefix = prefix.strip("/")

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    # ------------------------------------------------------------------ writing (the training host)
    def push(self, path: str | Path) -> None:
        """Copy one file of the run directory (a checkpoint or a ``done.json``) and its digest."""
        path = Path(path)
        relative = path.relative_to(self.run_dir).as_posix()
        digest = sha256_file(path)
        self.storage.put_file(self._key(relative), path)
        self.storage.put_bytes(self._key(relative + DIGEST_SUFFIX), digest.encode())
        if _step_of(path.name) is not None:
            self._drop_rotated(path.parent)

    def _drop_rotated(self, directory: Path) -> None:
        """Delete the stored snapshots of ``directory`` that the local rotation has deleted."""
        kept = set(CheckpointManager(directory).steps())
        folder = directory.relative_to(self.run_dir).as_posix()
        for key in list(self.storage.list(self._key(folder) + "/")):
            name = key.rsplit("/", 1)[-1]
            step = _step_of(name.removesuffix(DIGEST_SUFFIX))
            if step is not None and step < max(kept, default=0) and step not in kept:
                self.storage.delete(key)

    # ------------------------------------------------------------------ reading (any host)
    def pull(self) -> list[Path]:
        """Fetch what the store holds that is newer than this host's copy; returns the files written.

        Per checkpoint folder, the stored snapshots past the newest local one are fetched and verified,
        and ``latest.pt`` is repointed to the newest that arrived intact; missing ``done.json`` files are
        fetched too.
        """
        stored = self._stored()
        fetched: list[Path] = []
        for folder, names in sorted(stored.items()):
            local_dir = self.run_dir / folder if folder else self.run_dir
            if _DONE in names and not (local_dir / _DONE).is_file():
                fetched += self._fetch(folder, [_DONE])
            steps = sorted((s for s in map(_step_of, names) if s is not None), reverse=True)
            newest_local = max(CheckpointManager(local_dir).steps(), default=0)
            wanted = [step_filename(s) for s in steps if s > newest_local]
            got = self._fetch(folder, wanted)
            fetched += got
            if got:
                CheckpointManager(local_dir).repoint_latest()
        if fetched:
            log.info("fetched %d file(s) of %s from %s", len(fetched), self.prefix, self.storage.root_uri)
        return fetched

    def _stored(self) -> dict[str, set[str]]:
        """Stored file names with their digest present, per folder relative to the run."""
        keys = set(self.storage.list(self.prefix + "/"))
        out: dict[str, set[str]] = {}
        for key in keys:
            if key.endswith(DIGEST_SUFFIX) or key.removeprefix(self.prefix + "/") == key:
                continue
            if key + DIGEST_SUFFIX not in keys:  # its copy never finished
                continue
            folder, _, name = key[len(self.prefix) + 1 :].rpartition("/")
            out.setdefault(folder, set()).add(name)
        return out

    def _fetch(self, folder: str, names: Iterable[str]) -> list[Path]:
        """Download ``names`` of ``folder``, each checked against its stored digest; damaged ones skipped."""
        written = []
        for name in names:
            relative = f"{folder}/{name}" if folder else name
            digest = self.storage.get_bytes(self._key(relative + DIGEST_SUFFIX)).decode().strip()
            dest = self.run_dir / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.storage.get_file(self._key(relative), dest, sha256=digest)
            except IntegrityError as exc:
                log.warning("skipped a damaged stored checkpoint %s: %s", relative, exc)
                continue
            written.append(dest)
        return written
