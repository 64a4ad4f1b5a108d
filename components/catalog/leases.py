"""Leases on training-run rows: one process trains a configuration, identical requests wait and join it.

A lease is ``(lease_holder, lease_expires_at)`` on the :class:`~components.catalog.models.TrainingRun`
row of a (config hash, dataset version). It is taken with a conditional UPDATE (free, expired, or already
ours), which is atomic on SQLite and PostgreSQL alike, and the row itself is created under a unique
constraint, so exactly one of several concurrent requests holds it. The holder renews it from a
background thread (:class:`LeaseKeeper`); a holder that died stops renewing, its lease expires and the
next request takes the run over (and resumes it from its checkpoints).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import threading
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError

from components.catalog.db import Catalog, CatalogError, CatalogLostError, masked_url
from components.catalog.models import TrainingRun

__all__ = [
    "Claim",
    "LeaseKeeper",
    "LeaseLostError",
    "claim_run",
    "new_holder_id",
    "release_lease",
    "renew_lease",
    "update_leased",
]

log = logging.getLogger(__name__)
DEFAULT_TTL_S = 60.0


class LeaseLostError(CatalogError):
    """This process no longer holds the lease of the run it trains (taken over, or the catalog is gone)."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """The outcome of :func:`claim_run`: the row, whether we hold it, and who does otherwise."""

    row_id: int
    acquired: bool
    status: str
    run_id: str | None
    checkpoint_uri: str | None
    holder: str | None


def new_holder_id() -> str:
    """``host:pid:random``: unique per call, so two threads of one process are two holders."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read(catalog: Catalog, config_hash: str, version_id: int) -> TrainingRun | None:
    with catalog.session() as session:
        return session.scalars(
            sa.select(TrainingRun).where(
                TrainingRun.config_hash == config_hash, TrainingRun.dataset_version_id == version_id
            )
        ).first()


def _claim(row: TrainingRun, acquired: bool) -> Claim:
    return Claim(row.id, acquired, row.status, row.mlflow_run_id, row.checkpoint_uri, row.lease_holder)


def _insert(catalog: Catalog, config_hash: str, version_id: int, holder: str, ttl_s: float) -> Claim | None:
    """Create the row already leased to ``holder``; None when a concurrent request created it first."""
    try:
        with catalog.session() as session:
            row = TrainingRun(
                dataset_version_id=version_id,
                config_hash=config_hash,
                status="running",
                lease_holder=holder,
                lease_expires_at=_now() + dt.timedelta(seconds=ttl_s),
            )
            session.add(row)
            session.flush()
            return _claim(row, True)
    except IntegrityError:
        return None


def claim_run(
    catalog: Catalog, config_hash: str, version_id: int, holder: str, ttl_s: float = DEFAULT_TTL_S
) -> Claim:
    """Take the lease of (``config_hash``, ``version_id``) for ``holder`` if it is free, expired or ours.

    A finished run is never leased again (``acquired`` False, ``status`` "finished"); a run leased by a
    live holder comes back with ``acquired`` False and that holder, so the caller can wait for it.
    """
    row = _read(catalog, config_hash, version_id)
    if row is None:
        claim = _insert(catalog, config_hash, version_id, holder, ttl_s)
        if claim is not None:
            return claim
        row = _read(catalog, config_hash, version_id)
        if row is None:  # created and deleted again in between: start over
            return claim_run(catalog, config_hash, version_id, holder, ttl_s)
    now = _now()
    with catalog.session() as session:
        taken = session.execute(
            sa.update(TrainingRun)
            .where(
                TrainingRun.id == row.id,
                TrainingRun.status != "finished",
                sa.or_(
                    TrainingRun.lease_holder.is_(None),
                    TrainingRun.lease_expires_at < now,
                    TrainingRun.lease_holder == holder,
                ),
            )
            .values(status="running", lease_holder=holder, lease_expires_at=now + dt.timedelta(seconds=ttl_s))
            .execution_options(synchronize_session=False)
        ).rowcount
    fresh = _read(catalog, config_hash, version_id)
    if fresh is None:
        return claim_run(catalog, config_hash, version_id, holder, ttl_s)
    return _claim(fresh, taken == 1 and fresh.lease_holder == holder)


def update_leased(catalog: Catalog, row_id: int, holder: str, **values: Any) -> bool:
    """UPDATE the row only while ``holder`` holds its lease; True when it did (False: not ours any more)."""
    with catalog.session() as session:
        done = session.execute(
            sa.update(TrainingRun)
            .where(TrainingRun.id == row_id, TrainingRun.lease_holder == holder)
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
    return done == 1


def renew_lease(catalog: Catalog, row_id: int, holder: str, ttl_s: float = DEFAULT_TTL_S) -> bool:
    """Push the expiry ``ttl_s`` ahead; False when the lease is no longer ours (or the row is gone)."""
    return update_leased(catalog, row_id, holder, lease_expires_at=_now() + dt.timedelta(seconds=ttl_s))


def release_lease(catalog: Catalog, row_id: int, holder: str, **values: Any) -> None:
    """Record ``values`` (status, checkpoint, ...) and free the lease, atomically and only if ours.

    Raises :class:`LeaseLostError` when the lease was taken over or the row vanished: the result must
    not be recorded over another holder's run.
    """
    catalog.check_present()
    if not update_leased(catalog, row_id, holder, lease_holder=None, lease_expires_at=None, **values):
        raise LeaseLostError(
            f"training run {row_id} in the catalog {masked_url(catalog.url)} is no longer leased to this "
            "process (another one took it over, or the row was deleted); its result was not recorded: "
            "rerun the command to reuse or resume the run"
        )


class LeaseKeeper:
    """Renews a lease every ``ttl_s / 4`` seconds in a daemon thread; :meth:`check` raises once it is lost.

    Transient database errors (an unreachable server) are retried until the lease would have expired; a
    renewal the database refuses (another holder, deleted row) or a vanished catalog ends it at once.
    """

    def __init__(self, catalog: Catalog, row_id: int, holder: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.catalog, self.row_id, self.holder, self.ttl_s = catalog, row_id, holder, ttl_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"skf-lease-{row_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)

    def _run(self) -> None:
        deadline = _now() + dt.timedelta(seconds=self.ttl_s)
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.catalog.check_present()
                if not renew_lease(self.catalog, self.row_id, self.holder, self.ttl_s):
                    self.lost = "another process took the run over (or its row was deleted)"
                    return
                deadline = _now() + dt.timedelta(seconds=self.ttl_s)
            except CatalogLostError as exc:
                self.lost = str(exc)
                return
            except (CatalogError, DBAPIError) as exc:
                detail = exc.orig if isinstance(exc, DBAPIError) else exc
                log.warning("could not renew the lease of training run %d: %s", self.row_id, detail)
                if _now() >= deadline:
                    self.lost = f"the catalog could not be reached to renew the lease ({detail})"
                    return

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if renewing failed; called by the training loop every step."""
        if self.lost is not None:
            raise LeaseLostError(
                f"training run {self.row_id} lost its lease in the catalog {masked_url(self.catalog.url)}: "
                f"{self.lost}; training stopped, rerun the command to resume it"
            )
