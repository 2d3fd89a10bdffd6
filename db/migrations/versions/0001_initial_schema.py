"""Initial schema: batches, jobs, metric_points.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 00:08:45.030378
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=True),
        sa.Column("base_model", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batches_created_at"), ["created_at"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("batch_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("extension", sa.String(length=16), nullable=False),
        sa.Column("base_model", sa.String(length=500), nullable=False),
        sa.Column("requested_device", sa.String(length=32), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("dtype", sa.String(length=32), nullable=True),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("progress_step", sa.Integer(), nullable=True),
        sa.Column("progress_total", sa.Integer(), nullable=True),
        sa.Column("progress_loss", sa.Float(), nullable=True),
        sa.Column("progress_phase", sa.String(length=16), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("base_params", sa.BigInteger(), nullable=True),
        sa.Column("total_params", sa.BigInteger(), nullable=True),
        sa.Column("trainable_params", sa.BigInteger(), nullable=True),
        sa.Column("lora_params", sa.BigInteger(), nullable=True),
        sa.Column("layer_params", sa.BigInteger(), nullable=True),
        sa.Column("trainable_pct", sa.Float(), nullable=True),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("eval_loss", sa.Float(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("tokens_per_second", sa.Float(), nullable=True),
        sa.Column("train_seconds", sa.Float(), nullable=True),
        sa.Column("peak_memory_mb", sa.Float(), nullable=True),
        sa.Column("job_dir", sa.Text(), nullable=True),
        sa.Column("adapter_path", sa.Text(), nullable=True),
        sa.Column("layer_path", sa.Text(), nullable=True),
        sa.Column("versions", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_jobs_batch_id_batches"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_attempts"), ["attempts"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_base_params"), ["base_params"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index("ix_jobs_batch_id_status", ["batch_id", "status"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_eval_loss"), ["eval_loss"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_extension"), ["extension"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_finished_at"), ["finished_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_peak_memory_mb"), ["peak_memory_mb"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_started_at"), ["started_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_status"), ["status"], unique=False)
        batch_op.create_index("ix_jobs_status_heartbeat_at", ["status", "heartbeat_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_steps"), ["steps"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_task"), ["task"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_tokens_per_second"), ["tokens_per_second"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_total_params"), ["total_params"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_train_loss"), ["train_loss"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_train_seconds"), ["train_seconds"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_trainable_params"), ["trainable_params"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_trainable_pct"), ["trainable_pct"], unique=False)

    op.create_table(
        "metric_points",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_metric_points_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_points")),
    )
    with op.batch_alter_table("metric_points", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_metric_points_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("metric_points", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_metric_points_job_id"))

    op.drop_table("metric_points")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_trainable_pct"))
        batch_op.drop_index(batch_op.f("ix_jobs_trainable_params"))
        batch_op.drop_index(batch_op.f("ix_jobs_train_seconds"))
        batch_op.drop_index(batch_op.f("ix_jobs_train_loss"))
        batch_op.drop_index(batch_op.f("ix_jobs_total_params"))
        batch_op.drop_index(batch_op.f("ix_jobs_tokens_per_second"))
        batch_op.drop_index(batch_op.f("ix_jobs_task"))
        batch_op.drop_index(batch_op.f("ix_jobs_steps"))
        batch_op.drop_index("ix_jobs_status_heartbeat_at")
        batch_op.drop_index(batch_op.f("ix_jobs_status"))
        batch_op.drop_index(batch_op.f("ix_jobs_started_at"))
        batch_op.drop_index(batch_op.f("ix_jobs_peak_memory_mb"))
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))
        batch_op.drop_index(batch_op.f("ix_jobs_finished_at"))
        batch_op.drop_index(batch_op.f("ix_jobs_extension"))
        batch_op.drop_index(batch_op.f("ix_jobs_eval_loss"))
        batch_op.drop_index(batch_op.f("ix_jobs_created_at"))
        batch_op.drop_index("ix_jobs_batch_id_status")
        batch_op.drop_index(batch_op.f("ix_jobs_batch_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_base_params"))
        batch_op.drop_index(batch_op.f("ix_jobs_attempts"))

    op.drop_table("jobs")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_batches_created_at"))

    op.drop_table("batches")
