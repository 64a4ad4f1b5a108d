"""Training-run leases: one row per (config hash, dataset version), with a lease holder and its expiry.

Older catalogs could hold several rows of one configuration (two identical trainings started together);
only the newest was ever read, so the older duplicates are dropped before the unique constraint is added.

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "DELETE FROM training_runs WHERE id NOT IN "
        "(SELECT keep FROM (SELECT MAX(id) AS keep FROM training_runs "
        "GROUP BY config_hash, dataset_version_id) AS newest)"
    )
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("lease_holder", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_unique_constraint("uq_training_run_config", ["config_hash", "dataset_version_id"])


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint("uq_training_run_config", type_="unique")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_holder")
