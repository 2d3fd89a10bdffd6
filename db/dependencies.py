"""Jobs that wait for other jobs: their needs, their release when the needs succeed, and their skip.

A job with a need that has not succeeded is `waiting` and has no broker message. The outcome of
the job it needs decides it, in the transaction that records that outcome (so no caller can
record an outcome and forget its dependants, and a crash cannot separate the two):

- `release_dependants` (a job succeeded): every waiting job that needs it and whose needs have
  now all succeeded becomes `queued`, with no message yet; the caller publishes it after commit,
  and if that publish is lost the reaper does (`db.queries.unpublished_queued`);
- `skip_dependants` (a job failed, was cancelled or skipped): every job that needs it, directly
  or through other jobs, and is still waiting becomes `skipped`, with an error naming the job.

Every function takes a `Connection` in a write transaction and never commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, exists, insert, select, update

from db.tables import JobStatus, job_needs, jobs, utcnow

_ENDED_WITHOUT_SUCCESS = (JobStatus.FAILED.value, JobStatus.CANCELLED.value, JobStatus.SKIPPED.value)
_IN_CHUNK = 500  # ids per IN (...) clause; SQLite limits bound parameters per statement


def chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    """`items` in slices of at most `size` (one IN clause each)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def record_needs(connection: Connection, needs: Mapping[str, Iterable[str]]) -> None:
    """Insert one `job_needs` row per (job, job it needs); the jobs' rows must exist already."""
    rows = [{"job_id": job_id, "needed_id": needed} for job_id, needed_ids in needs.items() for needed in needed_ids]
    if rows:
        connection.execute(insert(job_needs), rows)


def needed_jobs(connection: Connection, job_ids: Sequence[str]) -> dict[str, Row[Any]]:
    """The rows of jobs that new jobs will need (id, task, status, extension, base_model, paths).

    They are locked against outcomes (PostgreSQL's FOR SHARE; SQLite's write transaction already
    excludes other writers) until the caller commits: an outcome recorded meanwhile waits, then
    finds the new `job_needs` rows and releases or skips the new jobs.
    """
    found: dict[str, Row[Any]] = {}
    for chunk in chunks(sorted(set(job_ids))):
        query = (select(jobs.c.id, jobs.c.task, jobs.c.status, jobs.c.extension, jobs.c.base_model,
                        jobs.c.adapter_path, jobs.c.layer_path)
                 .where(jobs.c.id.in_(chunk)).order_by(jobs.c.id).with_for_update(read=True))
        found.update({row.id: row for row in connection.execute(query)})
    return found


def _dependant_ids(connection: Connection, job_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(dependant, needed) pairs for the jobs that need one of `job_ids` (the index on needed_id)."""
    pairs: list[tuple[str, str]] = []
    for chunk in chunks(list(job_ids)):
        pairs += [(row.job_id, row.needed_id) for row in connection.execute(
            select(job_needs.c.job_id, job_needs.c.needed_id).where(job_needs.c.needed_id.in_(chunk)))]
    return pairs


def release_dependants(connection: Connection, job_id: str) -> list[str]:
    """After `job_id` succeeded: queue the waiting jobs that need it and now have every need met.

    Returns their ids. They are `queued` with `queued_at` now and no message (`published_at`
    NULL): the caller publishes them once the transaction has committed.
    """
    dependants = sorted({dependant for dependant, _ in _dependant_ids(connection, [job_id])})
    if not dependants:
        return []
    # PostgreSQL: two jobs needed by the same dependant may succeed at the same time; each would
    # see the other unfinished and release nothing. Locking the dependants serialises them: the
    # second waits here, and its next statement sees the first one's commit.
    connection.execute(select(jobs.c.id).where(jobs.c.id.in_(dependants)).order_by(jobs.c.id).with_for_update())
    need, parent = job_needs.alias("need"), jobs.alias("parent")
    unmet = exists(
        select(need.c.needed_id).select_from(need.join(parent, parent.c.id == need.c.needed_id))
        .where(need.c.job_id == jobs.c.id, parent.c.status != JobStatus.SUCCEEDED.value)
    )
    released = connection.execute(
        update(jobs)
        .where(jobs.c.id.in_(dependants), jobs.c.status == JobStatus.WAITING.value, ~unmet)
        .values(status=JobStatus.QUEUED.value, queued_at=utcnow(), published_at=None)
        .returning(jobs.c.id)
    )
    return sorted(released.scalars())


def skip_dependants(connection: Connection, job_ids: str | Sequence[str]) -> list[str]:
    """After jobs ended without success: skip every waiting job that needs one, transitively.

    Returns the skipped ids. Each one's error names the job it needed that ended so (for a
    grand-child, the skipped child).
    """
    skipped: list[str] = []
    frontier = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    while frontier:
        pairs = _dependant_ids(connection, frontier)
        if not pairs:
            break
        needed = sorted({parent for _, parent in pairs})
        parents = {}
        for chunk in chunks(needed):
            parents.update({row.id: row for row in connection.execute(
                select(jobs.c.id, jobs.c.task, jobs.c.status).where(jobs.c.id.in_(chunk)))})
        frontier = []
        now = utcnow()
        for parent in sorted(parents.values(), key=lambda row: row.id):
            if parent.status not in _ENDED_WITHOUT_SUCCESS:
                continue
            children = sorted({child for child, needed_id in pairs if needed_id == parent.id})
            for chunk in chunks(children):
                done = connection.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(chunk), jobs.c.status == JobStatus.WAITING.value)
                    .values(status=JobStatus.SKIPPED.value, finished_at=now, published_at=None,
                            error=f"skipped: job {parent.id} ({parent.task}) that it needs ended {parent.status}")
                    .returning(jobs.c.id)
                )
                frontier += done.scalars()
        skipped += frontier
    return skipped


def after_outcome(connection: Connection, job_id: str, status: str) -> list[str]:
    """Release (succeeded) or skip (failed, cancelled, skipped) `job_id`'s dependants; their ids."""
    if status == JobStatus.SUCCEEDED.value:
        return release_dependants(connection, job_id)
    if status in _ENDED_WITHOUT_SUCCESS:
        return skip_dependants(connection, job_id)
    return []


def released_unpublished(connection: Connection, job_id: str) -> list[Row[Any]]:
    """`(id, queue, priority)` of the queued broker jobs that need `job_id` and have no message yet."""
    return list(connection.execute(
        select(jobs.c.id, jobs.c.queue, jobs.c.priority)
        .select_from(jobs.join(job_needs, job_needs.c.job_id == jobs.c.id))
        .where(job_needs.c.needed_id == job_id, jobs.c.status == JobStatus.QUEUED.value,
               jobs.c.published_at.is_(None), jobs.c.queue.is_not(None))
        .order_by(jobs.c.id)
    ))


def settle_waiting(connection: Connection, limit: int = 1000) -> tuple[list[str], list[str]]:
    """The reaper's safety net: (released, skipped) waiting jobs whose needs are all decided.

    A waiting job is released when every job it needs has succeeded and skipped when one ended
    otherwise; outcomes do this themselves, so this finds only jobs that a row written behind
    graftq's back (or a partial `graftq retry`) left waiting.
    """
    need, parent = job_needs.alias("need"), jobs.alias("parent")

    def needs_where(*condition: Any) -> Any:
        return exists(select(need.c.needed_id).select_from(need.join(parent, parent.c.id == need.c.needed_id))
                      .where(need.c.job_id == jobs.c.id, *condition))

    waiting = jobs.c.status == JobStatus.WAITING.value
    ready = list(connection.scalars(
        select(jobs.c.id).where(waiting, ~needs_where(parent.c.status != JobStatus.SUCCEEDED.value)).limit(limit)))
    released: list[str] = []
    for chunk in chunks(ready):
        released += connection.execute(
            update(jobs).where(jobs.c.id.in_(chunk), waiting,
                               ~needs_where(parent.c.status != JobStatus.SUCCEEDED.value))
            .values(status=JobStatus.QUEUED.value, queued_at=utcnow(), published_at=None)
            .returning(jobs.c.id)
        ).scalars()
    blocked = list(connection.execute(
        select(need.c.needed_id).select_from(need.join(jobs, jobs.c.id == need.c.job_id)
                                             .join(parent, parent.c.id == need.c.needed_id))
        .where(waiting, parent.c.status.in_(_ENDED_WITHOUT_SUCCESS)).distinct().limit(limit)
    ).scalars())
    return released, skip_dependants(connection, blocked)


def needs_of(connection: Connection, job_id: str) -> list[str]:
    """Ids of the jobs `job_id` needs."""
    return sorted(connection.scalars(select(job_needs.c.needed_id).where(job_needs.c.job_id == job_id)))


def dependants_of(connection: Connection, job_id: str) -> list[str]:
    """Ids of the jobs that need `job_id`."""
    return sorted(connection.scalars(select(job_needs.c.job_id).where(job_needs.c.needed_id == job_id)))



def waiting_in_batch(connection: Connection, batch_id: str) -> list[str]:
    """Ids of the batch's `waiting` jobs."""
    return list(connection.scalars(
        select(jobs.c.id).where(jobs.c.batch_id == batch_id, jobs.c.status == JobStatus.WAITING.value)))
