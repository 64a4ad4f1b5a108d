"""Ingest a dataset source into content-addressed storage and an immutable catalog version.

A version's identity is its manifest: the sorted JSON lines ``(split, role, pair_key, sha256)`` of its
valid images, hashed with sha256. Label maps (role ``label``) are images of the manifest like the others,
and a version with label maps adds one line for its class names (role ``classes``, the sha256 of the
names as JSON), so renaming a class makes a new version; a source without label maps hashes exactly as
before labels existed. Ingesting content whose manifest already exists returns that version
untouched (idempotent). Otherwise images are stored first (``images/<sha[:2]>/<sha>.<ext>``, skipped when
present), and only then are the version, its images and its quarantined inputs written in ONE catalog
transaction, so a crash at any point leaves earlier versions intact and never a half version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from components.catalog import Dataset, DatasetVersion, Image, QuarantinedInput, open_catalog
from components.data.layouts import CLASSES_FILE, LABEL_ROLE, scan_layout
from components.data.records import (
    DatasetVersionRecord,
    ImageRecord,
    VersionSummary,
    count_by_split_role,
)
from components.data.sources import materialize, scratch_dir
from components.data.validation import (
    InvalidImage,
    QuarantineRecord,
    ValidatedEntry,
    open_source_file,
    resolve_limits,
    validate_scan,
)
from components.errors import SKFError, UserInputError
from components.progress import ProgressCallback
from components.settings import get_settings
from components.storage import open_storage

__all__ = [
    "DatasetNotFoundError",
    "IngestError",
    "IngestResult",
    "build_manifest",
    "get_version",
    "image_key",
    "ingest",
    "list_versions",
    "parse_ref",
    "summary_markdown",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_CHUNK = 1 << 20
_COMMIT_TRIES = 5
# Key of DatasetVersion.changes holding {rel_path: conversion} (the catalog has no per-image JSON column).
_CONVERSIONS = "conversions"
# Key of DatasetVersion.changes holding the label maps' class names in id order (no schema change needed).
_LABEL_CLASSES = "label_classes"
_METADATA_KEYS = (_CONVERSIONS, _LABEL_CLASSES)


class IngestError(SKFError, RuntimeError):
    """The source was readable but yielded nothing to ingest."""


class DatasetNotFoundError(SKFError, LookupError):
    """No dataset (or version) with the requested name/number."""

    exit_code = 2


@dataclass
class IngestResult:
    dataset: str
    version: int
    version_id: int
    manifest_sha256: str
    created: bool
    layout: str
    source_uri: str
    counts: dict[str, dict[str, int]]
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    changes: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    report_uri: str | None = None
    # rel_path -> what loading the stored (original) bytes as RGB does, for images that are not plain RGB.
    conversions: dict[str, str] = field(default_factory=dict)
    # Class names of the label maps (id order), empty for a source without label maps.
    label_classes: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version}"

    def quarantine_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.quarantined).items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (what flows return)."""
        out = asdict(self)
        out["ref"] = self.ref
        out["quarantined"] = [q.to_dict() for q in self.quarantined]
        out["quarantine_reasons"] = self.quarantine_reasons()
        return out

    def summary_markdown(self) -> str:
        return summary_markdown(self.to_dict())


def summary_markdown(summary: dict[str, Any]) -> str:
    """Markdown summary of :meth:`IngestResult.to_dict` output: counts, changes, quarantine reasons."""
    status = "created" if summary["created"] else "unchanged (identical content was already ingested)"
    lines = [
        f"# Ingest `{summary['ref']}`: {status}",
        "",
        f"Source `{summary['source_uri']}`, layout `{summary['layout']}`, "
        f"manifest sha256 `{summary['manifest_sha256'][:16]}...`",
        "",
        "| split | role | images |",
        "|---|---|---:|",
    ]
    lines += [f"| {s} | {r} | {n} |" for s, roles in summary["counts"].items() for r, n in roles.items()]
    lines += ["", "| change | pair keys |", "|---|---:|"]
    lines += [f"| {k} | {len(v)} |" for k, v in summary["changes"].items()]
    if summary.get("label_classes"):
        lines += ["", f"Label classes (id order): {', '.join(summary['label_classes'])}"]
    lines += ["", f"**Quarantined: {len(summary['quarantined'])}**"]
    if summary["quarantine_reasons"]:
        lines += ["", "| reason | files |", "|---|---:|"]
        lines += [f"| {reason} | {n} |" for reason, n in summary["quarantine_reasons"].items()]
    if summary["ignored"]:
        lines += ["", f"{len(summary['ignored'])} file(s) outside the layout's folders were ignored."]
    if summary.get("conversions"):
        lines += [
            "",
            f"{len(summary['conversions'])} image(s) are not plain RGB; see the report for how each loads.",
        ]
    if summary.get("report_uri"):
        lines += ["", f"Full report: `{summary['report_uri']}`"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- manifest
def image_key(sha256: str, ext: str) -> str:
    """Content-addressed storage key of an image."""
    return f"images/{sha256[:2]}/{sha256}.{ext}"


def build_manifest(items: list[tuple[str, str, str, str]]) -> tuple[str, str]:
    """(text, sha256) of the manifest of ``(split, role, pair_key, sha256)`` tuples (order-independent)."""
    lines = sorted(
        json.dumps({"split": s, "role": r, "pair_key": k, "sha256": h}, sort_keys=True, separators=(",", ":"))
        for s, r, k, h in items
    )
    text = "\n".join(lines) + "\n"
    return text, hashlib.sha256(text.encode()).hexdigest()


def classes_item(names: tuple[str, ...] | list[str]) -> tuple[str, str, str, str]:
    """The manifest line of a labelled version's class names (role ``classes``), hashing their JSON."""
    blob = json.dumps(list(names), separators=(",", ":")).encode()
    return "", "classes", CLASSES_FILE, hashlib.sha256(blob).hexdigest()


def _content_by_key(items: list[tuple[str, str, str, str]]) -> dict[str, tuple[tuple[str, str], ...]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for _split, role, key, sha in items:
        out.setdefault(key, []).append((role, sha))
    return {k: tuple(sorted(v)) for k, v in out.items()}


def diff_versions(
    old: list[tuple[str, str, str, str]], new: list[tuple[str, str, str, str]]
) -> dict[str, list[str]]:
    """Pair keys added, removed, or whose content (any role's sha256) changed between two manifests."""
    a, b = _content_by_key(old), _content_by_key(new)
    return {
        "added": sorted(b.keys() - a.keys()),
        "removed": sorted(a.keys() - b.keys()),
        "changed": sorted(k for k in a.keys() & b.keys() if a[k] != b[k]),
    }


# --------------------------------------------------------------------------------------------- catalog helpers
def _default_storage() -> Any:
    return open_storage(get_settings().storage_uri)


def check_dataset_name(name: str) -> None:
    """Raise :class:`UserInputError` unless ``name`` is a valid dataset name (versions are ``name@N``)."""
    if not _NAME.match(name):
        raise UserInputError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_' or '-' (no '@' or '/'), e.g. 'lol-v2-real'"
        )


def _summary(v: Any) -> dict[str, Any]:
    changes = {k: val for k, val in (v.changes or {}).items() if k not in _METADATA_KEYS}
    return {
        "name": v.dataset.name,
        "version": v.version,
        "id": v.id,
        "manifest_sha256": v.manifest_sha256,
        "layout": v.layout,
        "source_uri": v.source_uri,
        "image_count": v.image_count,
        "created_at": v.created_at,
        "changes": changes,
    }


def _image_record(img: Any, conversions: dict[str, str] | None = None) -> ImageRecord:
    return ImageRecord(
        sha256=img.sha256,
        split=img.split,
        role=img.role,
        pair_key=img.pair_key,
        uri=img.uri,
        width=img.width,
        height=img.height,
        rel_path=img.rel_path,
        conversion=(conversions or {}).get(img.rel_path, ""),
    )


def _version_record(v: Any) -> DatasetVersionRecord:
    conversions = (v.changes or {}).get(_CONVERSIONS, {})
    images = sorted(
        (_image_record(i, conversions) for i in v.images), key=lambda r: (r.split, r.pair_key, r.role)
    )
    classes = tuple((v.changes or {}).get(_LABEL_CLASSES, ()))
    return DatasetVersionRecord(**_summary(v), images=tuple(images), label_classes=classes)


def _manifest_items(records: list[ImageRecord] | tuple[ImageRecord, ...]) -> list[tuple[str, str, str, str]]:
    return [(r.split, r.role, r.pair_key, r.sha256) for r in records]


def _find_version(session: Session, name: str, manifest_sha256: str) -> Any:
    stmt = (
        sa.select(DatasetVersion)
        .join(Dataset)
        .where(Dataset.name == name, DatasetVersion.manifest_sha256 == manifest_sha256)
    )
    return session.scalars(stmt).first()


def _latest_version(session: Session, dataset_id: int) -> Any:

    stmt = (
        sa.select(DatasetVersion)
        .where(DatasetVersion.dataset_id == dataset_id)
        .order_by(DatasetVersion.version.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


# --------------------------------------------------------------------------------------------- reports
def _quarantine_report(result: IngestResult) -> tuple[bytes, bytes]:
    payload = {
        "dataset": result.dataset,
        "version": result.version,
        "source": result.source_uri,
        "layout": result.layout,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "reasons": result.quarantine_reasons(),
        "quarantined": [q.to_dict() for q in result.quarantined],
        "ignored": result.ignored,
        "conversions": result.conversions,
    }
    md = [f"# Quarantine report for `{result.ref}`", "", f"Source: `{result.source_uri}`", ""]
    if result.quarantined:
        md += ["| file | reason | detail |", "|---|---|---|"]
        md += [f"| `{q.rel_path}` | {q.reason} | {q.detail.replace('|', '/')} |" for q in result.quarantined]
    else:
        md.append("Nothing was quarantined.")
    if result.ignored:
        md += ["", "Files outside the layout's folders (not ingested):", ""]
        md += [f"- `{p}`" for p in result.ignored]
    if result.conversions:
        md += ["", "Images stored as-is that are not plain RGB (how each is converted when loaded):", ""]
        md += [f"- `{p}`: {c}" for p, c in sorted(result.conversions.items())]
    return json.dumps(payload, indent=2).encode(), ("\n".join(md) + "\n").encode()


# --------------------------------------------------------------------------------------------- ingest
def ingest(
    source: str,
    *,
    name: str,
    layout: str = "auto",
    catalog: Any = None,
    storage: Any = None,
    progress: ProgressCallback | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> IngestResult:
    """Ingest ``source`` (folder, archive or ``s3://`` prefix) as a new version of dataset ``name``.

    Returns the existing version (``created=False``) when identical content was ingested before.
    ``max_pixels``/``max_bytes`` default to SKF_MAX_IMAGE_PIXELS/SKF_MAX_FILE_BYTES. Raises
    :class:`~components.data.layouts.LayoutError` when the source matches no layout, and
    :class:`IngestError` when no valid image is left after validation.
    """
    check_dataset_name(name)
    max_pixels, max_bytes = resolve_limits(max_pixels, max_bytes)
    catalog = catalog if catalog is not None else open_catalog()
    storage = storage if storage is not None else _default_storage()
    report = progress or (lambda done, total: None)

    with materialize(source) as src:
        scan = scan_layout(src.root, layout, label=src.uri)
        n_files = len(scan.entries) + len(scan.leftovers)
        validation = validate_scan(
            scan, max_pixels=max_pixels, max_bytes=max_bytes, progress=lambda done: report(done, 2 * n_files)
        )
        quarantined = [QuarantineRecord(r.rel_path, r.reason, r.detail) for r in src.refused]
        quarantined += validation.quarantined
        valid = validation.valid
        if not valid:
            reasons = Counter(q.reason for q in quarantined)
            raise IngestError(
                f"{src.uri}: no valid image to ingest ({len(quarantined)} quarantined: "
                f"{', '.join(f'{r}={n}' for r, n in sorted(reasons.items())) or 'none'}); fix the inputs and retry"
            )
        items = [(v.entry.split, v.entry.role, v.entry.pair_key, v.info.sha256) for v in valid]
        classes = validation.label_classes
        _, manifest_sha = build_manifest(items + ([classes_item(classes)] if classes else []))
        base = IngestResult(
            dataset=name,
            version=0,
            version_id=0,
            manifest_sha256=manifest_sha,
            created=False,
            layout=scan.layout,
            source_uri=src.uri,
            counts=count_by_split_role((split, role) for split, role, _, _ in items),
            quarantined=quarantined,
            ignored=list(scan.ignored),
            conversions={
                v.entry.rel_path: v.info.conversion
                for v in valid
                if v.info.conversion and v.entry.role != LABEL_ROLE  # ids, never loaded as RGB
            },
            label_classes=list(classes),
        )

        existing = _existing(catalog, name, manifest_sha)
        if existing is not None:
            report(1, 1)
            return _as_existing(base, existing)

        total = n_files + len(valid)
        uris = _store_images(storage, src, valid, lambda done: report(n_files + done, total))

    return _commit_version(catalog, storage, base, valid, uris)


def _existing(catalog: Any, name: str, manifest_sha: str) -> DatasetVersionRecord | None:
    with catalog.session() as session:
        v = _find_version(session, name, manifest_sha)
        return _version_record(v) if v is not None else None


def _as_existing(base: IngestResult, existing: DatasetVersionRecord) -> IngestResult:
    base.version, base.version_id, base.created = existing.version, existing.id, False
    base.label_classes = list(existing.label_classes)
    base.counts, base.changes = existing.counts(), dict(existing.changes)
    return base


def _copy_verified(src: Any, item: ValidatedEntry, dest: Path) -> None:
    """Copy the validated file to ``dest`` (re-opened safely), failing if it changed since validation."""
    rel = item.entry.rel_path
    h, size = hashlib.sha256(), 0
    try:
        with open_source_file(src.root, rel) as f, open(dest, "wb") as out:
            while (chunk := f.read(_CHUNK)) and size <= item.info.nbytes:
                size += len(chunk)
                h.update(chunk)
                out.write(chunk)
    except InvalidImage as exc:
        raise IngestError(f"{src.uri}: {rel} changed while being ingested ({exc.detail}); retry") from exc
    if (size, h.hexdigest()) != (item.info.nbytes, item.info.sha256):
        raise IngestError(f"{src.uri}: {rel} changed while being ingested; retry when the source is stable")


def _store_images(
    storage: Any, src: Any, valid: list[ValidatedEntry], progress: Callable[[int], None]
) -> dict[str, str]:
    """Put every valid image into storage (skipping content already there); return sha256 -> URI.

    Files are streamed through a private scratch copy whose hash is checked against validation, so memory
    stays bounded and a file swapped after validation is never stored under the old content's key.
    """
    uris: dict[str, str] = {}
    with scratch_dir() as tmp:
        for done, item in enumerate(valid, start=1):
            sha = item.info.sha256
            if sha not in uris:
                key = image_key(sha, item.info.ext)
                if storage.exists(key):
                    uris[sha] = storage.uri_for(key)
                else:
                    copy = tmp / "image"
                    _copy_verified(src, item, copy)
                    uris[sha] = storage.put_file(key, copy)
                    copy.unlink()
            progress(done)
    return uris


def _lock_dataset(session: Session, name: str) -> Any:
    """The dataset row, created if needed, with version allocation for it serialised until commit.

    The no-op UPDATE comes first in the transaction: on SQLite it takes the database write lock (a
    concurrent ingest waits for the busy timeout), on PostgreSQL the dataset's row lock. Two first-time
    creators race on the unique name instead; the loser's IntegrityError is retried by the caller.
    """
    session.execute(
        sa.update(Dataset).where(Dataset.name == name).values(name=name),
        execution_options={"synchronize_session": False},
    )
    dataset = session.scalars(sa.select(Dataset).where(Dataset.name == name)).first()
    if dataset is None:
        dataset = Dataset(name=name)
        session.add(dataset)
        session.flush()
    return dataset


def _commit_version(
    catalog: Any, storage: Any, base: IngestResult, valid: list[ValidatedEntry], uris: dict[str, str]
) -> IngestResult:
    """Write the version in one transaction, retrying when a concurrent ingest took the number first."""
    for attempt in range(1, _COMMIT_TRIES + 1):
        try:
            return _commit_once(catalog, storage, base, valid, uris)
        except IntegrityError:
            # A concurrent ingest committed first: identical content means its version is ours too.
            existing = _existing(catalog, base.dataset, base.manifest_sha256)
            if existing is not None:
                return _as_existing(base, existing)
            if attempt == _COMMIT_TRIES:
                raise
    raise AssertionError("unreachable")


def _commit_once(
    catalog: Any, storage: Any, base: IngestResult, valid: list[ValidatedEntry], uris: dict[str, str]
) -> IngestResult:
    items = [(v.entry.split, v.entry.role, v.entry.pair_key, v.info.sha256) for v in valid]
    with catalog.session() as session:
        dataset = _lock_dataset(session, base.dataset)
        same = _find_version(session, base.dataset, base.manifest_sha256)
        if same is not None:  # committed by an ingest we waited for
            return _as_existing(base, _version_record(same))
        parent = _latest_version(session, dataset.id)
        old_items = _manifest_items([_image_record(i) for i in parent.images]) if parent is not None else []
        changes = diff_versions(old_items, items)
        version = DatasetVersion(
            dataset_id=dataset.id,
            version=(parent.version + 1) if parent is not None else 1,
            manifest_sha256=base.manifest_sha256,
            source_uri=base.source_uri,
            layout=base.layout,
            parent_id=parent.id if parent is not None else None,
            changes=_changes_with_metadata(changes, base),
            image_count=len(valid),
        )
        session.add(version)
        session.flush()
        session.add_all(_image_rows(version.id, valid, uris))
        session.add_all(_quarantine_rows(dataset.id, version.id, base))
        session.flush()
        base.version, base.version_id, base.created, base.changes = version.version, version.id, True, changes
        # Written before the commit: whenever the version exists, its report exists too. The dataset lock
        # is held, so no concurrent ingest can be writing the same report key.
        report_json, report_md = _quarantine_report(base)
        stem = f"reports/{base.dataset}/v{version.version}-quarantine"
        base.report_uri = storage.put_bytes(f"{stem}.json", report_json)
        storage.put_bytes(f"{stem}.md", report_md)
    return base


def _changes_with_metadata(changes: dict[str, list[str]], base: IngestResult) -> dict[str, Any]:
    """The diff plus what the catalog has no column for (conversions, class names), when there is any."""
    extra = {_CONVERSIONS: base.conversions, _LABEL_CLASSES: base.label_classes}
    return {**changes, **{k: v for k, v in extra.items() if v}}


def _image_rows(version_id: int, valid: list[ValidatedEntry], uris: dict[str, str]) -> list[Image]:
    return [
        Image(
            version_id=version_id,
            sha256=v.info.sha256,
            split=v.entry.split,
            role=v.entry.role,
            pair_key=v.entry.pair_key,
            rel_path=v.entry.rel_path,
            uri=uris[v.info.sha256],
            width=v.info.width,
            height=v.info.height,
        )
        for v in valid
    ]


def _quarantine_rows(dataset_id: int, version_id: int, base: IngestResult) -> list[QuarantinedInput]:
    return [
        QuarantinedInput(
            dataset_id=dataset_id,
            version_id=version_id,
            source_uri=base.source_uri,
            rel_path=q.rel_path,
            reason=q.reason,
            detail=q.detail,
            sha256=q.sha256,
        )
        for q in base.quarantined
    ]


# --------------------------------------------------------------------------------------------- queries
def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name@3"`` -> ("name", 3); ``"name"`` or ``"name@latest"`` -> ("name", None) meaning the latest."""
    name, sep, number = ref.strip().partition("@")
    if not name:
        raise UserInputError(f"invalid dataset reference {ref!r}: it has no dataset name; write e.g. 'lol@1'")
    check_dataset_name(name)
    if not sep or number == "latest":
        return name, None
    if not (number.isascii() and number.isdigit()) or int(number) < 1:
        raise UserInputError(
            f"invalid dataset reference {ref!r}: the version after '@' must be a whole number from 1 "
            f"or 'latest', e.g. '{name}@1' or just '{name}' for the latest version"
        )
    return name, int(number)


def list_versions(name: str, *, catalog: Any = None) -> list[VersionSummary]:
    """Versions of dataset ``name``, oldest first (empty if the dataset does not exist)."""
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.session() as session:
        stmt = (
            sa.select(DatasetVersion)
            .join(Dataset)
            .where(Dataset.name == name)
            .order_by(DatasetVersion.version)
        )
        return [VersionSummary(**_summary(v)) for v in session.scalars(stmt)]


def get_version(ref: str, *, catalog: Any = None) -> DatasetVersionRecord:
    """The version named by ``ref`` (``name@N`` or ``name`` for the latest), with its image records."""
    name, number = parse_ref(ref)
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.session() as session:
        stmt = sa.select(DatasetVersion).join(Dataset).where(Dataset.name == name)
        stmt = (
            stmt.order_by(DatasetVersion.version.desc())
            if number is None
            else stmt.where(DatasetVersion.version == number)
        )
        v = session.scalars(stmt.limit(1)).first()
        if v is None:
            known = session.scalars(
                sa.select(DatasetVersion.version).join(Dataset).where(Dataset.name == name)
            ).all()
            if known:
                raise DatasetNotFoundError(
                    f"dataset {name!r} has no version {number}; it has versions "
                    f"{', '.join(map(str, sorted(known)))}: use e.g. '{name}@{max(known)}'"
                )
            names = session.scalars(sa.select(Dataset.name).order_by(Dataset.name)).all()
            raise DatasetNotFoundError(
                f"no dataset named {name!r} in the catalog; known datasets: {', '.join(names[:20]) or 'none'} "
                "(ingest one with `skf ingest SOURCE --name NAME`)"
            )
        return _version_record(v)
