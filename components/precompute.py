"""Fill the prior cache for a dataset version: run the SKB once per low-light image that is not cached.

Cached entries are verified (:meth:`PriorCache.get`) and skipped without touching the SKB; a damaged
entry is deleted by the cache and recomputed here. Missing images are batched by size (the SKB needs
equal-sized inputs in a batch), image reads and cache writes overlap the forward passes on a small
thread pool, storage I/O is retried, and a failing image is recorded with its reason without stopping
the others.

An SKB that makes its priors from ground-truth label maps (``needs_labels``, the oracle
``skb/oracle-labels@1``) is fed each low image's label record from the dataset version, as
``skb(x, labels=...)``; a version without label maps for its inputs is refused up front
(:class:`MissingLabelsError`). Its priors are cached like any other SKB's, so training reads them
unchanged. The cache key stays (image sha256, fingerprint): an image re-ingested with a different label
map keeps its first priors until the cache entry is deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from components import registry
from components.catalog import Catalog, open_catalog
from components.data.records import DatasetVersionRecord, ImageRecord
from components.errors import SKFError
from components.prior_cache import CacheEntry, PriorCache
from components.progress import ProgressCallback
from components.skb import Priors, needs_labels
from components.storage import Storage, StorageError, open_storage

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_SKB = "skb/hrnet-w48-pascal@1"
DEFAULT_SPLITS: tuple[str, ...] = ("train", "test", "unpaired")
SKB_INPUT_ROLES: tuple[str, ...] = ("low", "unpaired")  # the cached SKB runs on the low-light input
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class MissingLabelsError(SKFError, LookupError):
    """The SKB needs label maps and the dataset version has none for some of its inputs."""


@dataclasses.dataclass
class PrecomputeSummary:
    """Outcome of one precompute run; ``errors`` maps an image sha256 to why it failed.

    ``seconds`` is the whole call (SKB build, verification, compute); ``images_per_s`` is the compute
    phase only (image reads, forward passes and cache writes of the images that were missing).
    """

    computed: int
    cached: int
    failed: int
    seconds: float
    images_per_s: float
    bytes_written: int
    fingerprint: str
    skb_spec_resolved: str
    pretrained: bool
    version_ref: str = ""
    total: int = 0
    corrupt: int = 0
    forward_passes: int = 0
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    oracle: bool = False  # priors made from ground-truth label maps (skb/oracle-labels@1)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs for tables in the CLI, logs and artifacts."""
        return [
            ("dataset version", self.version_ref),
            ("SKB", self.skb_spec_resolved),
            ("pretrained", _pretrained_text(self.pretrained, self.oracle)),
            ("fingerprint", self.fingerprint[:16]),
            ("images", str(self.total)),
            ("computed", str(self.computed)),
            ("cached (skipped)", str(self.cached)),
            ("corrupt (recomputed)", str(self.corrupt)),
            ("failed", str(self.failed)),
            ("SKB forward passes", str(self.forward_passes)),
            ("seconds", f"{self.seconds:.2f}"),
            ("images/s", f"{self.images_per_s:.3f}"),
            ("bytes written", f"{self.bytes_written:,}"),
        ]

    def to_markdown(self) -> str:
        lines = [f"# Priors for `{self.version_ref}`", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.rows()]
        if self.errors:
            lines += ["", "## Failures", "", "| image sha256 | error |", "|---|---|"]
            lines += [
                f"| `{sha[:16]}` | {msg.replace('|', '/')} |" for sha, msg in sorted(self.errors.items())
            ]
        return "\n".join(lines) + "\n"


def _pretrained_text(pretrained: bool, oracle: bool) -> str:
    if pretrained:
        return "yes"
    if oracle:
        return "NO (oracle: priors from ground-truth label maps, for benchmarks only)"
    return "NO (random init: priors carry no semantics)"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def with_retries(fn: Callable[[], T], what: str, *, attempts: int = 3, backoff_s: float = 0.2) -> T:
    """Run storage I/O ``fn``, retrying transient failures (StorageError, connection/OS errors)."""
    for attempt in range(attempts):
        try:
            return fn()
        except _PERMANENT_OS_ERRORS:
            raise
        except (StorageError, ConnectionError, TimeoutError, OSError) as exc:
            if attempt == attempts - 1:
                raise
            log.warning("%s failed (%s); retry %d/%d", what, exc, attempt + 1, attempts - 1)
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def select_images(records: Sequence[ImageRecord], splits: Sequence[str]) -> list[ImageRecord]:
    """The SKB inputs of ``splits``: low and unpaired images, one per content hash, in stable order."""
    unique: dict[str, ImageRecord] = {}
    for r in sorted(records, key=lambda r: (r.split, r.pair_key, r.sha256)):
        if r.split in splits and r.role in SKB_INPUT_ROLES:
            unique.setdefault(r.sha256, r)
    return list(unique.values())


def label_records(
    version: DatasetVersionRecord, images: Sequence[ImageRecord], spec: str
) -> dict[str, ImageRecord]:
    """Label record per SKB input (by image sha256); raises :class:`MissingLabelsError` when any is missing."""
    found = {r.sha256: label for r in images if (label := version.label_of(r)) is not None}
    missing = [r for r in images if r.sha256 not in found]
    if not missing:
        return found
    what = (
        "has no label maps"
        if not version.has_labels
        else f"has no label map for {len(missing)} of {len(images)} images"
    )
    examples = ", ".join(r.rel_path or r.pair_key for r in missing[:3])
    raise MissingLabelsError(
        f"dataset {version.ref} {what} (e.g. {examples}), and SKB {spec} makes its priors from ground-truth "
        "label maps: ingest a labelled source (a LOL tree with labels/ beside low/ and high/ and a "
        "classes.json, e.g. components.data.scenes.generate_scene_dataset) and precompute that version"
    )


def size_batches(records: Sequence[ImageRecord], batch_size: int) -> Iterator[list[ImageRecord]]:
    """Batches of at most ``batch_size`` images of one (H, W) each; sizes never mix."""
    by_size: dict[tuple[int, int], list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_size[(r.height, r.width)].append(r)
    for size in sorted(by_size):
        group = by_size[size]
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


class _Run:
    """Mutable state of one precompute run (counts, errors), shared by the worker threads' callbacks."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.computed = 0
        self.bytes_written = 0
        self.forward_passes = 0
        self.errors: dict[str, str] = {}
        self._progress = progress

    def fail(self, record: ImageRecord, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        log.error("priors for %s (%s) failed: %s", record.rel_path or record.uri, record.sha256[:16], msg)
        self.errors[record.sha256] = msg

    def advance(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress(self.done, self.total)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def precompute_priors(
    version_ref: str,
    skb_spec: str = DEFAULT_SKB,
    *,
    checkpoint: str | None = None,
    batch_size: int = 4,
    splits: Sequence[str] = DEFAULT_SPLITS,
    progress: ProgressCallback | None = None,
    catalog: Catalog | None = None,
    storage: Storage | None = None,
    skb: Any = None,
    device: str | torch.device | None = None,
    verify: bool = True,
    io_workers: int = 4,
) -> PrecomputeSummary:
    """Compute and cache the priors of every SKB input of ``version_ref`` that is not cached yet.

    ``skb`` may be a ready SKB (anything with ``fingerprint``, ``pretrained``, ``spec`` and
    ``__call__(x) -> Priors``); otherwise ``skb_spec`` is built with ``checkpoint`` on ``device``.
    ``verify=False`` trusts catalog rows instead of re-reading and checking every cached file.
    ``progress(done, total)`` is called as images are skipped or computed.
    """
    from components.data.ingest import get_version
    from components.settings import get_settings

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    catalog = catalog if catalog is not None else open_catalog()
    storage = storage if storage is not None else open_storage(get_settings().storage_uri)
    version = get_version(version_ref, catalog=catalog)
    images = select_images(version.images, tuple(splits))
    if skb is None:
        skb = registry.create(registry.resolved_spec(skb_spec), checkpoint=checkpoint, device=device)
    resolved = getattr(skb, "spec", None) or registry.resolved_spec(skb_spec)
    labels = label_records(version, images, resolved) if needs_labels(skb) else None
    cache = PriorCache(storage, catalog, skb.fingerprint)
    run = _Run(len(images), progress)

    todo, cached = _missing(cache, images, run, verify, io_workers)
    compute_start = time.perf_counter()
    if todo:
        _compute(skb, cache, todo, batch_size, run, io_workers, labels)
    compute_seconds = time.perf_counter() - compute_start

    seconds = time.perf_counter() - start
    summary = PrecomputeSummary(
        computed=run.computed,
        cached=cached,
        failed=len(run.errors),
        seconds=seconds,
        images_per_s=run.computed / compute_seconds if run.computed else 0.0,
        bytes_written=run.bytes_written,
        fingerprint=cache.fingerprint,
        skb_spec_resolved=resolved,
        pretrained=bool(skb.pretrained),
        version_ref=version.ref,
        total=len(images),
        corrupt=cache.stats.corrupt,
        forward_passes=run.forward_passes,
        errors=dict(run.errors),
        oracle=needs_labels(skb),
    )
    log.info("precompute %s: %s", version.ref, ", ".join(f"{k}={v}" for k, v in summary.rows()))
    return summary


def _missing(
    cache: PriorCache, images: list[ImageRecord], run: _Run, verify: bool, workers: int
) -> tuple[list[ImageRecord], int]:
    """(images whose priors must be computed, number found cached); unreadable entries count as errors.

    With ``verify`` every indexed entry is read back and checked (in parallel: object stores have
    latency); a damaged one is deleted by :meth:`PriorCache.get` and recomputed.
    """
    indexed = cache.cached(r.sha256 for r in images)
    todo = [r for r in images if r.sha256 not in indexed]
    hits = [r for r in images if r.sha256 in indexed]
    if not verify:
        run.advance(len(hits))
        return todo, len(hits)

    def check(r: ImageRecord) -> bool:
        return with_retries(lambda: cache.get(r.sha256), f"verify priors of {r.sha256[:16]}") is not None

    cached = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="priors-verify") as pool:
        for r, fut in [(r, pool.submit(check, r)) for r in hits]:
            try:
                ok = fut.result()
            except Exception as exc:
                run.fail(r, exc)
                run.advance(1)
                continue
            if ok:
                cached += 1
                run.advance(1)
            else:
                todo.append(r)
    return todo, cached


def _compute(
    skb: Any,
    cache: PriorCache,
    todo: list[ImageRecord],
    batch_size: int,
    run: _Run,
    workers: int,
    labels: dict[str, ImageRecord] | None = None,
) -> None:
    """Forward passes in size batches; the next batch loads and finished ones are written meanwhile.

    ``labels`` (image sha256 -> label record) is given for an SKB that needs label maps.
    """
    batches = list(size_batches(todo, batch_size))
    label_of = labels or {}

    def submit(pool: ThreadPoolExecutor, batch: list[ImageRecord]) -> list[Future[_Input]]:
        return [pool.submit(_load, r, label_of.get(r.sha256)) for r in batch]

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="priors-io") as pool:
        loading = submit(pool, batches[0])
        writes: list[tuple[ImageRecord, Future[CacheEntry]]] = []
        for i, batch in enumerate(batches):
            loaded = loading
            if i + 1 < len(batches):
                loading = submit(pool, batches[i + 1])
            inputs: list[tuple[ImageRecord, _Input]] = []
            for record, fut in zip(batch, loaded, strict=True):
                try:
                    inputs.append((record, fut.result()))
                except Exception as exc:
                    run.fail(record, exc)
            for record, priors in _forward(skb, inputs, run):
                size = (record.height, record.width)
                writes.append(
                    (
                        record,
                        pool.submit(
                            with_retries,
                            lambda r=record, p=priors, s=size: cache.put(r.sha256, p, image_size=s),
                            f"write priors of {record.sha256[:16]}",
                        ),
                    )
                )
            writes = _collect(writes, run, keep=2 * batch_size)
            run.advance(len(batch) - len(inputs))  # images that failed to load
        _collect(writes, run, keep=0)


@dataclasses.dataclass(frozen=True)
class _Input:
    """One SKB input: the image (3, H, W) in [0, 1], and its class-id map (H, W) int64 when needed."""

    image: Tensor
    labels: Tensor | None = None


def _load(record: ImageRecord, label: ImageRecord | None = None) -> _Input:
    """The image exactly as the training dataset decodes it, as float (3, H, W) in [0, 1], and its labels."""
    from components.data.torch_dataset import load_label, load_rgb

    rgb = with_retries(lambda: load_rgb(record), f"read {record.uri}")
    if rgb.shape[:2] != (record.height, record.width):
        raise ValueError(
            f"{record.uri} decodes to {rgb.shape[:2]} but the catalog says {(record.height, record.width)}; "
            "re-ingest the dataset"
        )
    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)
    if label is None:
        return _Input(image)
    ids = with_retries(lambda: load_label(label), f"read {label.uri}")
    if ids.shape != rgb.shape[:2]:
        raise ValueError(
            f"label map {label.rel_path or label.uri} is {ids.shape} but its image is {rgb.shape[:2]}; "
            "re-ingest the dataset"
        )
    return _Input(image, torch.from_numpy(ids.astype(np.int64)))


def _run_skb(skb: Any, inputs: Sequence[_Input]) -> Priors:
    """One forward pass over equal-size inputs, with their stacked label maps for an SKB that needs them."""
    x = torch.stack([i.image for i in inputs])
    if inputs[0].labels is None:
        return skb(x)
    return skb(x, labels=torch.stack([i.labels for i in inputs if i.labels is not None]))


def _forward(
    skb: Any, inputs: list[tuple[ImageRecord, _Input]], run: _Run
) -> Iterator[tuple[ImageRecord, Priors]]:
    """Priors per image of one equal-size batch; a failing batch is retried image by image."""
    if not inputs:
        return
    try:
        run.forward_passes += 1
        results = list(
            zip((r for r, _ in inputs), _run_skb(skb, [i for _, i in inputs]).unbind(), strict=True)
        )
    except Exception as exc:
        if len(inputs) == 1:
            run.fail(inputs[0][0], exc)
            run.advance(1)
            return
        log.warning("SKB batch of %d failed (%s); retrying image by image", len(inputs), exc)
    else:
        yield from results
        return
    for record, item in inputs:
        try:
            run.forward_passes += 1
            priors = _run_skb(skb, [item])
        except Exception as exc:
            run.fail(record, exc)
            run.advance(1)
        else:
            yield record, priors


def _collect(
    writes: list[tuple[ImageRecord, Future[CacheEntry]]], run: _Run, keep: int
) -> list[tuple[ImageRecord, Future[CacheEntry]]]:
    """Wait for all but the newest ``keep`` pending writes (bounds memory held by queued priors)."""
    while len(writes) > keep:
        record, fut = writes.pop(0)
        try:
            entry = fut.result()
        except Exception as exc:
            run.fail(record, exc)
        else:
            run.computed += 1
            if entry.created:
                run.bytes_written += entry.nbytes
        run.advance(1)
    return writes
