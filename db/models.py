"""ORM classes over the results database tables (`db.tables`): batches, jobs, loss curves.

The columns are declared once, as Core tables in `db.tables`, and mapped here (SQLAlchemy's
"declarative with imperative table"): read-only CLI commands query the tables without
importing the ORM, and everything else gets the same `Mapped` attributes as before. The
annotations below only type the attributes; the tables say what is stored.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped, relationship

from db import tables
from db.tables import (
    FINISHED_STATUSES,
    NAMING_CONVENTION,
    SORTABLE_COLUMNS,
    JobStatus,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "FINISHED_STATUSES", "NAMING_CONVENTION", "SORTABLE_COLUMNS", "Base", "Batch", "Job", "JobStatus",
    "MetricPoint", "UTCDateTime", "utcnow",
]


class Base(DeclarativeBase):
    metadata = tables.metadata


class Batch(Base):
    __table__ = tables.batches

    id: Mapped[str]
    name: Mapped[str]
    source_path: Mapped[str | None]
    base_model: Mapped[str | None]
    created_at: Mapped[dt.datetime]

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", passive_deletes=True)


class Job(Base):
    __table__ = tables.jobs

    id: Mapped[str]
    batch_id: Mapped[str]
    position: Mapped[int]
    task: Mapped[str]
    kind: Mapped[str]
    extension: Mapped[str]
    base_model: Mapped[str]
    requested_device: Mapped[str]
    queue: Mapped[str | None]
    spec: Mapped[dict[str, Any]]

    status: Mapped[str]
    attempts: Mapped[int]
    max_attempts: Mapped[int]
    worker: Mapped[str | None]
    device: Mapped[str | None]
    dtype: Mapped[str | None]
    claim_token: Mapped[str | None]
    heartbeat_at: Mapped[dt.datetime | None]
    cancel_requested: Mapped[bool]
    progress_step: Mapped[int | None]
    progress_total: Mapped[int | None]
    progress_loss: Mapped[float | None]
    progress_phase: Mapped[str | None]
    published_at: Mapped[dt.datetime | None]

    base_params: Mapped[int | None]
    total_params: Mapped[int | None]
    trainable_params: Mapped[int | None]
    lora_params: Mapped[int | None]
    layer_params: Mapped[int | None]
    trainable_pct: Mapped[float | None]

    train_loss: Mapped[float | None]
    eval_loss: Mapped[float | None]
    steps: Mapped[int | None]
    tokens_per_second: Mapped[float | None]
    train_seconds: Mapped[float | None]
    peak_memory_mb: Mapped[float | None]

    job_dir: Mapped[str | None]
    adapter_path: Mapped[str | None]
    layer_path: Mapped[str | None]
    versions: Mapped[dict[str, Any] | None]
    error: Mapped[str | None]
    traceback: Mapped[str | None]

    created_at: Mapped[dt.datetime]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    batch: Mapped[Batch] = relationship(back_populates="jobs")


class MetricPoint(Base):
    """One point of a job's loss curve."""

    __table__ = tables.metric_points

    id: Mapped[int]
    job_id: Mapped[str]
    step: Mapped[int]
    split: Mapped[str]
    loss: Mapped[float]
