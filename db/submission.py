"""The writes of `graftq submit` (and `graftq run`, `graftq retry`): a batch, its jobs and their publication.

These functions take a `Connection` in a write transaction (`database.begin()`) and never commit.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from db.dependencies import chunks, needed_jobs, record_needs, skip_dependants
from db.tables import JobStatus, batches, job_needs, utcnow
from db.tables import jobs as _jobs


def new_id() -> str:
    """A fresh batch or job id: 16 lowercase hex digits (also used in artifact paths)."""
    return uuid.uuid4().hex[:16]


def create_batch(
    connection: Connection,
    name: str,
    jobs: Sequence[Mapping[str, Any]],
    *,
    source_path: str | None = None,
    base_model: str | None = None,
    max_attempts: int = 3,
) -> tuple[str, list[str]]:
    """Insert a batch, its jobs and what they need; returns `(batch_id, job_ids)`.

    Each job mapping has `task`, `kind`, `extension`, `base_model`, `requested_device`,
    `queue` and `spec` (the validated spec as JSON), and may have `id` (else one is generated),
    `name`, `params`, `priority` (0 if not given), `gpus` (1 if not given) and `needs` (ids of the jobs it
    waits for: of this batch, or recorded earlier). A job with a need that has not succeeded is `waiting` (no message is to be
    published for it), the others `queued`. Needs recorded earlier must exist; they are locked
    until commit, so an outcome recorded meanwhile still finds the new jobs.
    """
    batch_id = new_id()
    now = utcnow()
    ids = [job.get("id") or new_id() for job in jobs]
    own = set(ids)
    needs = {job_id: list(job.get("needs") or ()) for job_id, job in zip(ids, jobs, strict=True)}
    earlier = needed_jobs(connection, [needed for wanted in needs.values() for needed in wanted if needed not in own])
    succeeded = {job_id for job_id, row in earlier.items() if row.status == JobStatus.SUCCEEDED.value}
    connection.execute(insert(batches).values(id=batch_id, name=name, source_path=source_path,
                                              base_model=base_model, created_at=now))
    rows = []
    for position, (job_id, job) in enumerate(zip(ids, jobs, strict=True)):
        waiting = any(needed not in succeeded for needed in needs[job_id])
        rows.append({
            "id": job_id, "batch_id": batch_id, "position": position, "task": job["task"],
            "name": job.get("name"), "params": dict(job.get("params") or {}),
            "kind": job["kind"], "extension": job["extension"], "base_model": job["base_model"],
            "requested_device": job.get("requested_device", "auto"), "queue": job.get("queue"),
            "spec": job["spec"], "priority": job.get("priority", 0),
            "status": JobStatus.WAITING.value if waiting else JobStatus.QUEUED.value,
            "attempts": 0, "max_attempts": max_attempts, "cancel_requested": False, "created_at": now,
            "queued_at": None if waiting else now, "gpus": job.get("gpus", 1),
        })
    if rows:
        connection.execute(insert(_jobs), rows)  # one executemany
    record_needs(connection, needs)
    return batch_id, ids


def mark_published(connection: Connection, job_ids: Sequence[str], when: dt.datetime | None = None) -> None:
    """Record that the messages of `job_ids` were handed to the broker."""
    when = when or utcnow()
    for chunk in chunks(job_ids):
        connection.execute(update(_jobs).where(_jobs.c.id.in_(chunk)).values(published_at=when))


def mark_batch_published(connection: Connection, batch_id: str, when: dt.datetime | None = None) -> int:
    """Record that every message of a batch was handed to the broker; returns how many rows.

    One statement for the whole batch (a 10,000-job submit would otherwise pay 20 `IN`
    updates); jobs already marked keep their first time. Waiting jobs have no message: they are
    published when the jobs they need succeed.
    """
    result = connection.execute(
        update(_jobs)
        .where(_jobs.c.batch_id == batch_id, _jobs.c.published_at.is_(None),
               _jobs.c.status != JobStatus.WAITING.value)
        .values(published_at=when or utcnow())
    )
    return result.rowcount


def fail_unpublished(connection: Connection, job_ids: Sequence[str], error: str) -> int:
    """Mark still-queued jobs whose message never reached the broker as failed; returns how many.

    The jobs waiting for them are skipped.
    """
    failed: list[str] = []
    now = utcnow()
    for chunk in chunks(job_ids):
        failed += connection.execute(
            update(_jobs)
            .where(_jobs.c.id.in_(chunk), _jobs.c.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.FAILED.value, error=error, finished_at=now)
            .returning(_jobs.c.id)
        ).scalars()
    skip_dependants(connection, failed)
    return len(failed)


#: What `graftq retry` takes back to the queue: finished jobs that did not succeed.
RETRYABLE_STATUSES = (JobStatus.FAILED.value, JobStatus.CANCELLED.value, JobStatus.SKIPPED.value)


@dataclass
class Retried:
    """What `retry_jobs` did: queued jobs (with their queue), waiting ones (with the jobs they
    still need), jobs it did not retry because a job they need failed and is not retried with
    them (with those jobs), and the jobs it left alone (with their status, or `missing`)."""

    queued: dict[str, str | None] = field(default_factory=dict)
    waiting: dict[str, list[str]] = field(default_factory=dict)
    blocked: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def retry_jobs(
    connection: Connection,
    job_ids: Sequence[str],
    *,
    statuses: Collection[str] = RETRYABLE_STATUSES,
    queues: Mapping[str, str] | None = None,
) -> Retried:
    """Put finished jobs whose status is in `statuses` back to `queued` with a fresh attempt budget.

    A job that needs (`job_needs`) a job that has not succeeded becomes `waiting` instead, unless
    a job it needs has finished without success and is not retried here (it would wait forever):
    such a job is left as it is, in `blocked`. The earlier run (status, error, attempts, worker,
    started_at, finished_at) is appended to the job's `history`; its claim, error, traceback,
    progress and times are cleared. `queues` gives a queue to jobs that have none (recorded by
    `graftq run`). Other jobs are left alone, in `refused`. The caller publishes the queued jobs
    after commit (`mark_published`).
    """
    statuses = set(statuses) & set(RETRYABLE_STATUSES)
    job_ids = list(dict.fromkeys(job_ids))
    found = {}
    for chunk in chunks(job_ids):
        # FOR UPDATE: a concurrent retry or cancel waits, so each job's history gains its run once.
        found.update((row.id, row) for row in connection.execute(
            select(_jobs.c.id, _jobs.c.status, _jobs.c.error, _jobs.c.attempts, _jobs.c.worker, _jobs.c.started_at,
                   _jobs.c.finished_at, _jobs.c.history, _jobs.c.queue)
            .where(_jobs.c.id.in_(chunk)).with_for_update()
        ))
    retried = Retried()
    for job_id in job_ids:
        if job_id not in found or found[job_id].status not in statuses:
            retried.refused[job_id] = found[job_id].status if job_id in found else "missing"
    chosen = [job_id for job_id in job_ids if job_id not in retried.refused]
    unmet = _unmet_needs(connection, chosen)
    retried.blocked = _blocked(chosen, unmet)
    now = utcnow()
    queues = queues or {}
    updates = []
    for job_id in chosen:
        if job_id in retried.blocked:
            continue
        row = found[job_id]
        queue = row.queue or queues.get(job_id)
        waits = job_id in unmet
        if waits:
            retried.waiting[job_id] = [needed_id for needed_id, _ in unmet[job_id]]
        else:
            retried.queued[job_id] = queue
        updates.append({
            "b_id": job_id, "b_status": JobStatus.WAITING.value if waits else JobStatus.QUEUED.value,
            "b_queue": queue, "b_queued_at": None if waits else now,
            "b_history": [*(row.history or []), _earlier_run(row)],
        })
    if updates:
        connection.execute(
            update(_jobs).where(_jobs.c.id == bindparam("b_id"))
            .values(status=bindparam("b_status"), queue=bindparam("b_queue"),
                    queued_at=bindparam("b_queued_at", type_=_jobs.c.queued_at.type),
                    history=bindparam("b_history", type_=_jobs.c.history.type),
                    attempts=0, cancel_requested=False, claim_token=None, worker=None, device=None, dtype=None,
                    error=None, traceback=None, heartbeat_at=None, started_at=None, finished_at=None,
                    published_at=None, progress_step=None, progress_total=None, progress_loss=None,
                    progress_phase=None),
            updates,
        )
    return retried


def _unmet_needs(connection: Connection, job_ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """job id -> `(needed id, status)` of the jobs it needs that have not succeeded (only jobs with any)."""
    needed = _jobs.alias("needed")
    unmet: dict[str, list[tuple[str, str]]] = {}
    for chunk in chunks(list(job_ids)):
        for job_id, needed_id, status in connection.execute(
            select(job_needs.c.job_id, job_needs.c.needed_id, needed.c.status)
            .join(needed, needed.c.id == job_needs.c.needed_id)
            .where(job_needs.c.job_id.in_(chunk), needed.c.status != JobStatus.SUCCEEDED.value)
            .order_by(job_needs.c.job_id, job_needs.c.needed_id)
        ):
            unmet.setdefault(job_id, []).append((needed_id, status))
    return unmet


def _blocked(chosen: Sequence[str], unmet: Mapping[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """The chosen jobs that need a finished, unsucceeded job that is not retried with them (directly
    or through another blocked job), with those jobs."""
    retried = set(chosen)
    blocked: dict[str, list[str]] = {}
    changed = True
    while changed:
        changed = False
        for job_id in chosen:
            if job_id in blocked:
                continue
            stuck = [needed_id for needed_id, status in unmet.get(job_id, ())
                     if (needed_id not in retried or needed_id in blocked) and JobStatus(status).finished]
            if stuck:
                blocked[job_id] = stuck
                changed = True
    return blocked


def _earlier_run(row: Any) -> dict[str, Any]:
    """A finished run as `history` keeps it (times as ISO text)."""
    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {"status": row.status, "error": row.error, "attempts": row.attempts, "worker": row.worker,
            "started_at": iso(row.started_at), "finished_at": iso(row.finished_at)}
