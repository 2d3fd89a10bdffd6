"""The results database: batches, jobs and their loss curves.

The `jobs` row is the source of truth for a job; a broker message only carries its id.
Times are stored as UTC and read back as timezone-aware UTC datetimes on every backend.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A DateTime that always stores UTC and returns aware UTC datetimes.

    SQLite keeps no time zone; without this, values read back would be naive and
    compare wrongly against aware ones.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(UTC)")
        value = value.astimezone(dt.UTC)
        # SQLite compares the stored text; keep one format (no offset) so that comparisons hold.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source_path: Mapped[str | None] = mapped_column(Text)
    base_model: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", passive_deletes=True)


#: Result columns that `graftq results --sort` accepts; each has an index.
SORTABLE_COLUMNS = (
    "created_at", "started_at", "finished_at", "task", "status", "extension", "kind", "attempts",
    "train_loss", "eval_loss", "steps", "tokens_per_second", "train_seconds", "peak_memory_mb",
    "trainable_params", "trainable_pct", "total_params", "base_params",
)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)  # index of the job in its batch file
    task: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    extension: Mapped[str] = mapped_column(String(16), index=True)
    base_model: Mapped[str] = mapped_column(String(500))
    requested_device: Mapped[str] = mapped_column(String(32), default="auto")
    queue: Mapped[str | None] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, index=True)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(32))
    dtype: Mapped[str | None] = mapped_column(String(32))
    claim_token: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_step: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    progress_loss: Mapped[float | None] = mapped_column(Float)
    progress_phase: Mapped[str | None] = mapped_column(String(16))
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    base_params: Mapped[int | None] = mapped_column(BigInteger, index=True)
    total_params: Mapped[int | None] = mapped_column(BigInteger, index=True)
    trainable_params: Mapped[int | None] = mapped_column(BigInteger, index=True)
    lora_params: Mapped[int | None] = mapped_column(BigInteger)
    layer_params: Mapped[int | None] = mapped_column(BigInteger)
    trainable_pct: Mapped[float | None] = mapped_column(Float, index=True)

    train_loss: Mapped[float | None] = mapped_column(Float, index=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, index=True)
    steps: Mapped[int | None] = mapped_column(Integer, index=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, index=True)
    train_seconds: Mapped[float | None] = mapped_column(Float, index=True)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float, index=True)

    job_dir: Mapped[str | None] = mapped_column(Text)
    adapter_path: Mapped[str | None] = mapped_column(Text)
    layer_path: Mapped[str | None] = mapped_column(Text)
    versions: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)

    batch: Mapped[Batch] = relationship(back_populates="jobs")

    __table_args__ = (
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
    )


class MetricPoint(Base):
    """One point of a job's loss curve."""

    __tablename__ = "metric_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(8))  # "train" or "eval"
    loss: Mapped[float] = mapped_column(Float)
