"""The results database schema as SQLAlchemy Core tables: batches, jobs and their loss curves.

The ORM classes in `db.models` are mapped onto these tables; `graftq results` (reads) and
`graftq submit` (`db.submission`) use them directly, without importing the ORM (~0.05-0.1 s
of a CLI start).
The `jobs` row is the source of truth for a job; a broker message only carries its id.
Times are stored as UTC and read back as timezone-aware UTC datetimes on every backend.
Schema changes only through an Alembic revision (`db/migrations/versions`).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


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

#: Result columns that `graftq results --sort` accepts; each has an index.
SORTABLE_COLUMNS = (
    "created_at", "started_at", "finished_at", "task", "status", "extension", "kind", "attempts",
    "train_loss", "eval_loss", "steps", "tokens_per_second", "train_seconds", "peak_memory_mb",
    "trainable_params", "trainable_pct", "total_params", "base_params",
)


def _required(name: str, type_: Any, **options: Any) -> Column[Any]:
    return Column(name, type_, nullable=False, **options)


def _optional(name: str, type_: Any, **options: Any) -> Column[Any]:
    return Column(name, type_, nullable=True, **options)


batches = Table(
    "batches", metadata,
    _required("id", String(32), primary_key=True),
    _required("name", String(200)),
    _optional("source_path", Text),
    _optional("base_model", String(500)),
    _required("created_at", UTCDateTime, default=utcnow, index=True),
)

jobs = Table(
    "jobs", metadata,
    _required("id", String(32), primary_key=True),
    _required("batch_id", ForeignKey("batches.id", ondelete="CASCADE"), index=True),
    _required("position", Integer, default=0),  # index of the job in its batch file
    _required("task", String(64), index=True),
    _required("kind", String(16), index=True),
    _required("extension", String(16), index=True),
    _required("base_model", String(500)),
    _required("requested_device", String(32), default="auto"),
    _optional("queue", String(100)),
    _required("spec", JSON),

    _required("status", String(16), default=JobStatus.QUEUED.value, index=True),
    _required("attempts", Integer, default=0, index=True),
    _required("max_attempts", Integer, default=3),
    _optional("worker", String(200)),
    _optional("device", String(32)),
    _optional("dtype", String(32)),
    _optional("claim_token", String(64)),
    _optional("heartbeat_at", UTCDateTime),
    _required("cancel_requested", Boolean, default=False),
    _optional("progress_step", Integer),
    _optional("progress_total", Integer),
    _optional("progress_loss", Float),
    _optional("progress_phase", String(16)),
    _optional("published_at", UTCDateTime),

    _optional("base_params", BigInteger, index=True),
    _optional("total_params", BigInteger, index=True),
    _optional("trainable_params", BigInteger, index=True),
    _optional("lora_params", BigInteger),
    _optional("layer_params", BigInteger),
    _optional("trainable_pct", Float, index=True),

    _optional("train_loss", Float, index=True),
    _optional("eval_loss", Float, index=True),
    _optional("steps", Integer, index=True),
    _optional("tokens_per_second", Float, index=True),
    _optional("train_seconds", Float, index=True),
    _optional("peak_memory_mb", Float, index=True),

    _optional("job_dir", Text),
    _optional("adapter_path", Text),
    _optional("layer_path", Text),
    _optional("versions", JSON),
    _optional("error", Text),
    _optional("traceback", Text),

    _required("created_at", UTCDateTime, default=utcnow, index=True),
    _optional("started_at", UTCDateTime, index=True),
    _optional("finished_at", UTCDateTime, index=True),

    Index("ix_jobs_batch_id_status", "batch_id", "status"),
    Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
)

metric_points = Table(
    "metric_points", metadata,  # one point of a job's loss curve
    _required("id", Integer, primary_key=True, autoincrement=True),
    _required("job_id", ForeignKey("jobs.id", ondelete="CASCADE"), index=True),
    _required("step", Integer),
    _required("split", String(8)),  # "train" or "eval"
    _required("loss", Float),
)
