"""The rows of `graftq results`, read with SQLAlchemy Core (no ORM import: a faster CLI start).

    with database.connect() as connection:
        rows = result_rows(connection, sort="eval_loss", limit=20)

`result_rows` takes a Core `Connection` or an ORM `Session` (both execute Core statements),
and never commits.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select

from db.tables import SORTABLE_COLUMNS, batches, jobs

#: The keys of one `graftq results` row, in column order (DESIGN.md).
RESULT_FIELDS = (
    "id", "batch_id", "batch", "task", "kind", "extension", "status", "attempts", "base_model",
    "device", "dtype", "worker", "base_params", "total_params", "trainable_params", "lora_params",
    "layer_params", "trainable_pct", "adapter_path", "layer_path", "train_loss", "eval_loss", "steps",
    "tokens_per_second", "train_seconds", "peak_memory_mb", "error", "created_at", "started_at",
    "finished_at",
)

_COLUMNS = [batches.c.name.label("batch") if key == "batch" else jobs.c[key] for key in RESULT_FIELDS]


def result_rows(
    connection: Any,
    *,
    batch: str | None = None,
    task: str | None = None,
    extension: str | None = None,
    status: str | None = None,
    limit: int | None = None,
    sort: str = "created_at",
    descending: bool = False,
) -> list[dict[str, Any]]:
    """Result rows (dicts with `RESULT_FIELDS`) filtered and sorted; nulls sort last.

    `batch` matches a batch id or a batch name; ties are broken by job id (in the same
    direction). Raises ValueError for a sort field that is not in `SORTABLE_COLUMNS`.
    """
    if sort not in SORTABLE_COLUMNS:
        raise ValueError(f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE_COLUMNS)}")
    column = jobs.c[sort]
    base = select(*_COLUMNS).select_from(jobs.join(batches, jobs.c.batch_id == batches.c.id))
    if batch is not None:
        base = base.where(or_(jobs.c.batch_id == batch, batches.c.name == batch))
    if task is not None:
        base = base.where(jobs.c.task == task)
    if extension is not None:
        base = base.where(jobs.c.extension == extension)
    if status is not None:
        base = base.where(jobs.c.status == status)
    order = column.desc() if descending else column.asc()
    tie = jobs.c.id.desc() if descending else jobs.c.id.asc()
    # Two range scans instead of `ORDER BY col IS NULL, col`, which no index can serve:
    # the non-null values in index order, then (if the limit is not reached) the nulls.
    rows = list(connection.execute(base.where(column.is_not(None)).order_by(order, tie).limit(limit)))
    if limit is None or len(rows) < limit:
        remaining = None if limit is None else limit - len(rows)
        rows += list(connection.execute(base.where(column.is_(None)).order_by(tie).limit(remaining)))
    return [dict(row._mapping) for row in rows]
