"""Campaigns: job names, matrix params, dependencies between jobs, retry history; task metrics.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 14:40:00.000000

Adds `jobs.name`, `jobs.params` (the matrix values that made a job), `jobs.queued_at` (when it
last became queued) and `jobs.history` (earlier runs, kept by `graftq retry`), and the
`job_needs` table (which jobs a job waits for); `jobs.head_params` (a classifier's head),
`jobs.metrics` (task metrics by name) and `jobs.samples` (eval rows' input / target / prediction).
Existing jobs keep their rows unchanged: no name, no params, no dependencies. The new statuses (`waiting`, `skipped`) need no change.
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
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("params", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("history", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("head_params", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("metrics", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("samples", sa.JSON(), nullable=True))

    op.create_table(
        "job_needs",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("needed_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_needs_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["needed_id"], ["jobs.id"], name=op.f("fk_job_needs_needed_id_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "needed_id", name=op.f("pk_job_needs")),
    )
    with op.batch_alter_table("job_needs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_needs_needed_id"), ["needed_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_needs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_needs_needed_id"))
    op.drop_table("job_needs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("samples")
        batch_op.drop_column("metrics")
        batch_op.drop_column("head_params")
        batch_op.drop_column("history")
        batch_op.drop_column("queued_at")
        batch_op.drop_column("params")
        batch_op.drop_column("name")
