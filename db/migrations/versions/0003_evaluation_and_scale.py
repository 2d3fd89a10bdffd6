"""Evaluation and scale: metric curves, best checkpoint, named eval sets, priorities, GPUs, packing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 17:10:00.000000

`metric_points` gains `metric` (the loss, or a task metric's name; existing points are losses)
and its `loss` column becomes `value`. `jobs` gains `best_step`, `best_metric` and `best_value`
(the evaluation `train.keep: best` kept), `eval_sets` (task metrics per named evaluation set),
`priority` (0-9) and `gpus` (the GPUs one job runs on), `micro_batch_size` (the micro-batch a job
trained with, after any out-of-memory back-off) and `packed_with` (the jobs trained in one process
with it). Existing jobs get priority 0 and one GPU; the other new columns stay null.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("metric_points", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metric", sa.String(length=64), nullable=False, server_default="loss"))
        batch_op.alter_column("loss", new_column_name="value", existing_type=sa.Float(), existing_nullable=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("best_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("best_metric", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("best_value", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("eval_sets", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("micro_batch_size", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("packed_with", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_best_step"), ["best_step"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_best_step"))
        for name in ("packed_with", "micro_batch_size", "gpus", "priority", "eval_sets", "best_value",
                     "best_metric", "best_step"):
            batch_op.drop_column(name)
    with op.batch_alter_table("metric_points", schema=None) as batch_op:
        batch_op.alter_column("value", new_column_name="loss", existing_type=sa.Float(), existing_nullable=False)
        batch_op.drop_column("metric")
