"""Typed SQLAlchemy 2 ORM of the catalog: datasets, immutable versions, images, quarantine, priors, runs.

A dataset version is immutable: its identity is the sha256 of its manifest (sorted records of
split/role/pair key/content hash), so re-ingesting identical content finds the existing version.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Deterministic constraint names on every backend, so migrations can refer to them (SQLite batch mode
# needs names to alter a table) and autogenerate comparisons are stable.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: DateTime(timezone=True)}


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)

    versions: Mapped[list[DatasetVersion]] = relationship(
        back_populates="dataset",
        order_by="DatasetVersion.version",
        cascade="all, delete-orphan",
        passive_deletes=True,  # the database cascades; no need to load every version to delete it
    )


class DatasetVersion(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "version", name="uq_dataset_version_number"),
        UniqueConstraint("dataset_id", "manifest_sha256", name="uq_dataset_version_manifest"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    source_uri: Mapped[str] = mapped_column(Text)
    layout: Mapped[str] = mapped_column(String(40))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="SET NULL"), default=None
    )
    # What changed relative to the parent: {"added": [...], "removed": [...], "changed": [...]}.
    changes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)

    dataset: Mapped[Dataset] = relationship(back_populates="versions")
    images: Mapped[list[Image]] = relationship(
        back_populates="version", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def ref(self) -> str:
        """Human and flow-friendly reference, e.g. ``lol@3``."""
        return f"{self.dataset.name}@{self.version}"


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_version_split", "version_id", "split"),
        Index("ix_images_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(20))  # train | test | unpaired
    role: Mapped[str] = mapped_column(String(10))  # low | high | unpaired
    pair_key: Mapped[str] = mapped_column(String(300))
    rel_path: Mapped[str] = mapped_column(Text)  # path inside the source, for reports
    uri: Mapped[str] = mapped_column(Text)  # content-addressed location in storage
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)

    version: Mapped[DatasetVersion] = relationship(back_populates="images")


class QuarantinedInput(Base):
    __tablename__ = "quarantined_inputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    version_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="SET NULL"), default=None
    )
    source_uri: Mapped[str] = mapped_column(Text)
    rel_path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(40))  # machine-readable code, e.g. "truncated"
    detail: Mapped[str] = mapped_column(Text, default="")
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)


class PriorCacheEntry(Base):
    __tablename__ = "prior_cache_entries"
    __table_args__ = (UniqueConstraint("image_sha256", "fingerprint", name="uq_prior_entry"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_sha256: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))  # of the stored file, verified on read
    nbytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)


class TrainingRun(Base):
    """One training configuration on one dataset version; its lease says which process trains it now.

    ``lease_holder``/``lease_expires_at`` are taken and renewed with conditional UPDATEs
    (:mod:`components.catalog.leases`), so two identical ``skf train`` runs never train into one MLflow run.
    """

    __tablename__ = "training_runs"
    __table_args__ = (UniqueConstraint("config_hash", "dataset_version_id", name="uq_training_run_config"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"))
    config_hash: Mapped[str] = mapped_column(String(64), index=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(20), default="running")
    checkpoint_uri: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    lease_holder: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
