"""The results database schema as SQLAlchemy Core tables: batches, jobs and their loss curves.

`FIELDS` declares the job fields a user sees once: their columns, `graftq results`' keys
and sort fields, `graftq show`'s sections and the README's field list come from it.
The `jobs` row is the source of truth for a job; a broker message only carries its id.
Times are stored as UTC and read back as timezone-aware UTC datetimes on every backend.
Schema changes only through an Alembic revision (`db/migrations/versions`).
"""

from __future__ import annotations

import datetime as dt
import textwrap
from dataclasses import dataclass
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
    WAITING = "waiting"  # for the jobs it needs; not published until they all succeed
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # a job it needs did not succeed; it never ran

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SKIPPED})


@dataclass(frozen=True)
class Field:
    """A job field a user sees: a key of `graftq results` and a line of `graftq show`."""

    name: str
    type: Any  # the column's SQL type; None for `batch`, the name of the job's batch
    section: str | None = "job"  # the `graftq show` section; None: shown on its own (the error)
    sortable: bool = False  # `graftq results --sort` takes it; indexed
    required: bool = False  # NOT NULL
    default: Any = None
    result: bool = True  # a key of `graftq results` (else only `graftq show` has it)
    note: str = ""  # said about it in the README
    index: bool = False  # indexed though not sortable
    primary_key: bool = False
    server_default: str | None = None  # what a revision gives the rows that existed before the column

    def column(self) -> Column[Any]:
        return Column(self.name, self.type, nullable=not self.required, default=self.default,
                      server_default=self.server_default, index=self.sortable or self.index or None,
                      primary_key=self.primary_key)


#: The job fields a user sees, in the order of `graftq results`' keys. The `statistics` and
#: `metrics` sections are what a finished job records (`db.claims.finish_job`).
FIELDS = (
    Field("id", String(32), required=True, primary_key=True),
    Field("batch_id", ForeignKey("batches.id", ondelete="CASCADE"), required=True, index=True),
    Field("batch", None),
    Field("task", String(64), sortable=True, required=True),
    Field("name", String(64), note="the job's `name` in the batch file, or null"),
    Field("kind", String(16), sortable=True, required=True),
    Field("extension", String(16), sortable=True, required=True),
    Field("params", JSON, note="the `matrix`/`sample` values that made the job: dotted key → value, `{}` if none"),
    Field("status", String(16), sortable=True, required=True, default=JobStatus.QUEUED.value),
    Field("priority", Integer, required=True, default=0, server_default="0",
          note="0-9, higher first (`priority` in the batch file, `graftq submit --priority`)"),
    Field("gpus", Integer, required=True, default=1, server_default="1",
          note="the GPUs the job runs on (`resources.gpus`)"),
    Field("packed_with", JSON, note="the ids of the jobs trained in one process with it (`--pack`), null if alone"),
    Field("attempts", Integer, sortable=True, required=True, default=0),
    Field("max_attempts", Integer, required=True, default=3, result=False),
    Field("base_model", String(500), required=True),
    Field("requested_device", String(32), required=True, default="auto", result=False),
    Field("queue", String(100), result=False),
    Field("device", String(32)),
    Field("dtype", String(32)),
    Field("worker", String(200)),
    Field("base_params", BigInteger, "statistics", sortable=True),
    Field("total_params", BigInteger, "statistics", sortable=True),
    Field("trainable_params", BigInteger, "statistics", sortable=True),
    Field("lora_params", BigInteger, "statistics"),
    Field("layer_params", BigInteger, "statistics"),
    Field("head_params", BigInteger, "statistics", note="a classifier's trained head"),
    Field("trainable_pct", Float, "statistics", sortable=True, note="= trainable / base × 100"),
    Field("job_dir", Text, "artifacts", result=False),
    Field("adapter_path", Text, "artifacts"),
    Field("layer_path", Text, "artifacts"),
    Field("train_loss", Float, "metrics", sortable=True),
    Field("eval_loss", Float, "metrics", sortable=True),
    Field("steps", Integer, "metrics", sortable=True),
    Field("tokens_per_second", Float, "metrics", sortable=True),
    Field("train_seconds", Float, "metrics", sortable=True),
    Field("peak_memory_mb", Float, "metrics", sortable=True),
    Field("micro_batch_size", Integer, "metrics",
          note="the micro-batch it trained with: `train.batch_size`, halved by each out-of-memory back-off"),
    Field("best_step", Integer, "metrics", sortable=True,
          note="the step whose weights were kept (`train.keep: best`), or null"),
    Field("best_metric", String(64), "metrics", note="what chose `best_step`: `eval_loss` or a task metric"),
    Field("best_value", Float, "metrics", note="its value at `best_step`"),
    Field("metrics", JSON, None, note="task metrics on the eval split: name → value, `{}` if none"),
    Field("eval_sets", JSON, None,
          note="per `eval.datasets` set: {name: {eval_loss, metric → value}}, `{}` if none"),
    Field("samples", JSON, None, result=False),  # eval rows' input / target / prediction, for `graftq show`
    Field("error", Text, None),
    Field("created_at", UTCDateTime, sortable=True, required=True, default=utcnow),
    Field("published_at", UTCDateTime, result=False),
    Field("started_at", UTCDateTime, sortable=True),
    Field("finished_at", UTCDateTime, sortable=True),
    Field("heartbeat_at", UTCDateTime, result=False),
    Field("cancel_requested", Boolean, required=True, default=False, result=False),
    # When the job last became `queued` (created, released by the jobs it needs, retried): the
    # reaper's grace period for a missing message counts from it.
    Field("queued_at", UTCDateTime, result=False),
    Field("history", JSON, None, result=False),  # earlier runs' outcomes, kept by `graftq retry`
)
_FIELDS = {field.name: field for field in FIELDS}

#: The keys of one `graftq results` row, in column order.
RESULT_FIELDS = tuple(field.name for field in FIELDS if field.result)
#: Result columns that `graftq results --sort` accepts; each has an index.
SORTABLE_COLUMNS = tuple(field.name for field in FIELDS if field.sortable)
#: Result columns that hold numbers (right-aligned in tables).
NUMERIC_FIELDS = frozenset(field.name for field in FIELDS if field.type in (Integer, BigInteger, Float))
#: `graftq show`'s sections and their fields, in order.
SHOW_SECTIONS = {section: tuple(field.name for field in FIELDS if field.section == section)
                 for section in ("job", "statistics", "metrics", "artifacts")}
STAT_FIELDS = SHOW_SECTIONS["statistics"]
METRIC_FIELDS = SHOW_SECTIONS["metrics"]


def result_fields_markdown() -> str:
    """The README's list of `graftq results` keys, generated from `FIELDS`."""
    keys = ", ".join(f"`{f.name}`" + (f" ({f.note})" if f.note else "") for f in FIELDS if f.result)
    sortable = ", ".join(f"`{name}`" for name in SORTABLE_COLUMNS)
    return (textwrap.fill(keys + ".", width=92, break_long_words=False, break_on_hyphens=False) + "\n\n"
            + textwrap.fill(f"`--sort` takes {sortable}.", width=92, break_long_words=False,
                            break_on_hyphens=False) + "\n")


def _fields(*names: str) -> list[Column[Any]]:
    return [_FIELDS[name].column() for name in names]


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

# The columns keep the order of the first revision (`FIELDS` is in `graftq results`' order);
# the fields' columns are built from `FIELDS`, the others are the worker's bookkeeping.
jobs = Table(
    "jobs", metadata,
    *_fields("id", "batch_id"),
    _required("position", Integer, default=0),  # index of the job in its batch file
    *_fields("task", "kind", "extension", "base_model", "requested_device", "queue"),
    _required("spec", JSON),
    *_fields("status", "attempts", "max_attempts", "worker", "device", "dtype"),
    _optional("claim_token", String(64)),
    *_fields("heartbeat_at", "cancel_requested"),
    _optional("progress_step", Integer),
    _optional("progress_total", Integer),
    _optional("progress_loss", Float),
    _optional("progress_phase", String(16)),
    *_fields("published_at", "base_params", "total_params", "trainable_params", "lora_params", "layer_params",
             "trainable_pct", "train_loss", "eval_loss", "steps", "tokens_per_second", "train_seconds",
             "peak_memory_mb", "job_dir", "adapter_path", "layer_path"),
    _optional("versions", JSON),
    *_fields("error"),
    _optional("traceback", Text),
    *_fields("created_at", "started_at", "finished_at"),
    # Revision 0002 (campaigns) added these at the end.
    *_fields("name", "params", "queued_at", "history", "head_params", "metrics", "samples"),
    # Revision 0003 (evaluation and scale).
    *_fields("best_step", "best_metric", "best_value", "eval_sets", "priority", "gpus", "micro_batch_size",
             "packed_with"),
    Index("ix_jobs_batch_id_status", "batch_id", "status"),
    Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
)

job_needs = Table(
    "job_needs", metadata,  # job `job_id` waits for job `needed_id` (which may be of another batch)
    _required("job_id", ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    _required("needed_id", ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True, index=True),
)

metric_points = Table(
    "metric_points", metadata,  # one point of a job's loss curve, or of a task metric's curve
    _required("id", Integer, primary_key=True, autoincrement=True),
    _required("job_id", ForeignKey("jobs.id", ondelete="CASCADE"), index=True),
    _required("step", Integer),
    _required("split", String(8)),  # "train" or "eval"
    _required("value", Float),
    _required("metric", String(64), server_default="loss"),  # "loss", or a task metric's name
)
