"""The writes of `graftq submit` (and `graftq run`): a batch, its jobs and their publication.

These functions take a `Connection` in a write transaction (`database.begin()`) and never commit.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, insert, update

from db.tables import JobStatus, batches, utcnow
from db.tables import jobs as _jobs

_IN_CHUNK = 500  # ids per IN (...) clause; SQLite limits bound parameters per statement


def new_id() -> str:
    """A fresh batch or job id: 16 lowercase hex digits (also used in artifact paths)."""
    return uuid.uuid4().hex[:16]


def chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def create_batch(
    connection: Connection,
    name: str,
    jobs: Sequence[Mapping[str, Any]],
    *,
    source_path: str | None = None,
    base_model: str | None = None,
    max_attempts: int = 3,
) -> tuple[str, list[str]]:
    """Insert a batch and its jobs (status `queued`); returns `(batch_id, job_ids)`.

    Each job mapping has `task`, `kind`, `extension`, `base_model`, `requested_device`,
    `queue` and `spec` (the validated spec as JSON). Ids are generated here.
    """
    batch_id = new_id()
    now = utcnow()
    connection.execute(insert(batches).values(id=batch_id, name=name, source_path=source_path,
                                              base_model=base_model, created_at=now))
    rows = []
    for position, job in enumerate(jobs):
        rows.append({
            "id": new_id(), "batch_id": batch_id, "position": position, "task": job["task"],
            "kind": job["kind"], "extension": job["extension"], "base_model": job["base_model"],
            "requested_device": job.get("requested_device", "auto"), "queue": job.get("queue"),
            "spec": job["spec"], "status": JobStatus.QUEUED.value, "attempts": 0,
            "max_attempts": max_attempts, "cancel_requested": False, "created_at": now,
        })
    if rows:
        connection.execute(insert(_jobs), rows)  # one executemany
    return batch_id, [row["id"] for row in rows]


def mark_published(connection: Connection, job_ids: Sequence[str], when: dt.datetime | None = None) -> None:
    """Record that the messages of `job_ids` were handed to the broker."""
    when = when or utcnow()
    for chunk in chunks(job_ids):
        connection.execute(update(_jobs).where(_jobs.c.id.in_(chunk)).values(published_at=when))


def mark_batch_published(connection: Connection, batch_id: str, when: dt.datetime | None = None) -> int:
    """Record that every message of a batch was handed to the broker; returns how many rows.

    One statement for the whole batch (a 10,000-job submit would otherwise pay 20 `IN`
    updates); jobs already marked keep their first time.
    """
    result = connection.execute(
        update(_jobs)
        .where(_jobs.c.batch_id == batch_id, _jobs.c.published_at.is_(None))
        .values(published_at=when or utcnow())
    )
    return result.rowcount


def fail_unpublished(connection: Connection, job_ids: Sequence[str], error: str) -> int:
    """Mark still-queued jobs whose message never reached the broker as failed; returns how many."""
    count = 0
    now = utcnow()
    for chunk in chunks(job_ids):
        result = connection.execute(
            update(_jobs)
            .where(_jobs.c.id.in_(chunk), _jobs.c.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.FAILED.value, error=error, finished_at=now)
        )
        count += result.rowcount
    return count
