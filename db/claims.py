"""A job's claim, from the worker's side: claim, heartbeat, progress and the outcome.

Every function takes a `Connection` in a write transaction (`with database.begin() as
connection:`) and never commits.

Writes made on behalf of a running job are *fenced*: they name the claim token the worker
got from its claim and change nothing once another worker has taken the job over, so a
worker that lost its claim (it looked dead, the job was re-queued) can never overwrite the
newer attempt's record. The reaper's side (find, settle and re-queue jobs whose worker died)
is here too.

Every outcome also decides the jobs that wait for this one, in the same transaction
(`db.dependencies`): a success releases them, any other end skips them.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, delete, insert, or_, select, update

from db.dependencies import release_dependants, skip_dependants
from db.tables import METRIC_FIELDS, STAT_FIELDS, JobStatus, jobs, metric_points, utcnow


@dataclass(frozen=True)
class Claim:
    """A claimed job: the claim token and what the worker needs to run the job."""

    token: str
    batch_id: str
    spec: dict[str, Any]
    attempts: int  # this attempt's number
    queue: str | None


@dataclass(frozen=True)
class ClaimState:
    """What a heartbeat found: whether the claim is still ours, and whether to stop."""

    held: bool
    cancel_requested: bool


def _is_stale(stale_after: float, now: dt.datetime) -> ColumnElement[bool]:
    """A job whose heartbeat is missing or older than `stale_after` seconds."""
    cutoff = now - dt.timedelta(seconds=stale_after)
    return or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < cutoff)


def _fenced(job_id: str, token: str) -> ColumnElement[bool]:
    """The job's row while this claim holds it."""
    return and_(jobs.c.id == job_id, jobs.c.claim_token == token, jobs.c.status == JobStatus.RUNNING.value)


def claim_job(connection: Connection, job_id: str, worker: str, stale_after: float) -> Claim | None:
    """Claim a job for one attempt; returns the `Claim`, or None when not claimable.

    Claimable: `queued`, or `running` with a heartbeat older than `stale_after` seconds (its
    worker died), and fewer attempts than its limit. The claim is one conditional UPDATE, so
    of two workers given the same job exactly one gets a token. Increments `attempts`. The
    UPDATE returns the job's batch, spec, attempt and queue itself (RETURNING: SQLite 3.35+
    and PostgreSQL), so a worker reads nothing else before it starts.
    """
    now = utcnow()
    token = secrets.token_hex(16)
    row = connection.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.attempts < jobs.c.max_attempts,
            jobs.c.cancel_requested.is_(False),
            or_(jobs.c.status == JobStatus.QUEUED.value,
                and_(jobs.c.status == JobStatus.RUNNING.value, _is_stale(stale_after, now))),
        )
        .values(
            status=JobStatus.RUNNING.value, attempts=jobs.c.attempts + 1, claim_token=token, worker=worker,
            heartbeat_at=now, started_at=now, finished_at=None, error=None, traceback=None, progress_step=None,
            progress_total=None, progress_loss=None, progress_phase="setup",
        )
        .returning(jobs.c.batch_id, jobs.c.spec, jobs.c.attempts, jobs.c.queue)
    ).first()
    if row is None:
        return None
    return Claim(token=token, batch_id=row.batch_id, spec=row.spec, attempts=row.attempts, queue=row.queue)


def pack_candidates(connection: Connection, job_id: str, queue: str | None, batch_id: str,
                    limit: int = 200) -> list[tuple[str, dict[str, Any]]]:
    """(id, spec) of queued jobs that a worker holding `job_id` may try to claim as well (`--pack`).

    The jobs of the same queue, highest priority first, then oldest; for a job of `graftq run` (no
    queue) the queue-less jobs of its own batch. Whether they can train together is the caller's
    test; each is then claimed with `claim_job`, which a job taken meanwhile refuses.
    """
    where = [jobs.c.id != job_id, jobs.c.status == JobStatus.QUEUED.value, jobs.c.cancel_requested.is_(False),
             jobs.c.attempts < jobs.c.max_attempts]
    where += [jobs.c.queue == queue] if queue is not None else [jobs.c.queue.is_(None), jobs.c.batch_id == batch_id]
    rows = connection.execute(
        select(jobs.c.id, jobs.c.spec).where(*where)
        .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id).limit(limit)
    )
    return [(row.id, row.spec) for row in rows]


def heartbeat(connection: Connection, job_id: str, token: str) -> ClaimState:
    """Refresh the claim's heartbeat; says whether the claim is still held and if cancel was asked."""
    result = connection.execute(update(jobs).where(_fenced(job_id, token)).values(heartbeat_at=utcnow()))
    cancel = connection.scalar(select(jobs.c.cancel_requested).where(jobs.c.id == job_id))
    return ClaimState(held=result.rowcount == 1, cancel_requested=bool(cancel))


def record_progress(
    connection: Connection, job_id: str, token: str, step: int, total: int | None,
    loss: float | None, phase: str | None = None,
) -> bool:
    """Write the running job's progress; returns False when the claim is no longer held."""
    result = connection.execute(
        update(jobs)
        .where(_fenced(job_id, token))
        .values(progress_step=step, progress_total=total, progress_loss=loss, progress_phase=phase,
                heartbeat_at=utcnow())
    )
    return result.rowcount == 1


def _declared(job_id: str, what: str, values: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"job {job_id}: {what} key(s) {', '.join(map(repr, unknown))} are not result fields; "
                         f"record only {', '.join(fields)} (or declare the new field in db.tables.FIELDS, "
                         "with an Alembic revision)")
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"job {job_id}: {what} key {name!r} is {value}; a succeeded job records finite "
                             "values (fail the job instead)")
    return {name: values.get(name) for name in fields}


def _finite_scores(job_id: str, what: str, values: Mapping[str, float]) -> dict[str, float]:
    scores = {str(name): float(value) for name, value in values.items()}
    for name, value in scores.items():
        if not math.isfinite(value):
            raise ValueError(f"job {job_id}: {what} {name} is {value}; a succeeded job records finite values")
    return scores


def finish_job(
    connection: Connection,
    job_id: str,
    token: str,
    *,
    stats: Mapping[str, Any],
    metrics: Mapping[str, Any],
    device: str | None,
    dtype: str | None,
    versions: Mapping[str, Any] | None,
    job_dir: str | None,
    adapter_path: str | None = None,
    layer_path: str | None = None,
    loss_curve: Iterable[tuple[int, str, float]] = (),
    task_metrics: Mapping[str, float] | None = None,
    samples: Sequence[Mapping[str, str]] | None = None,
    metric_curve: Iterable[tuple[int, str, float]] = (),
    eval_sets: Mapping[str, Mapping[str, float]] | None = None,
    packed_with: Sequence[str] | None = None,
) -> bool:
    """Record a succeeded job (statistics, metrics, task metrics, samples, paths, loss curve) if the claim is held.

    The waiting jobs that need it and now have every need met become `queued` in the same
    transaction (`release_dependants`); the caller publishes them after commit.
    Returns False, writing nothing, when another attempt owns the job now. Raises ValueError
    for a `stats` or `metrics` key that is not a field of that section (`db.tables.FIELDS`),
    and for a non-finite loss or task metric; a missing one is recorded as null.
    """
    points = [
        {"job_id": job_id, "step": int(step), "split": str(split), "metric": "loss", "value": float(loss)}
        for step, split, loss in loss_curve
    ] + [
        {"job_id": job_id, "step": int(step), "split": "eval", "metric": str(name), "value": float(value)}
        for step, name, value in metric_curve
    ]
    for point in points:
        if not math.isfinite(point["value"]):
            raise ValueError(f"job {job_id}: the {point['metric']} curve's point at step {point['step']} is "
                             f"{point['value']}; a succeeded job records finite values (fail the job instead)")
    scores = _finite_scores(job_id, "task metric", task_metrics or {})
    sets = {str(name): _finite_scores(job_id, f"eval set {name!r}: metric", values)
            for name, values in (eval_sets or {}).items()}
    now = utcnow()
    result = connection.execute(
        update(jobs)
        .where(_fenced(job_id, token))
        .values(
            **_declared(job_id, "stats", stats, STAT_FIELDS), **_declared(job_id, "metrics", metrics, METRIC_FIELDS),
            device=device, dtype=dtype, versions=dict(versions) if versions is not None else None, job_dir=job_dir,
            adapter_path=adapter_path, layer_path=layer_path, metrics=scores, eval_sets=sets,
            packed_with=list(packed_with) if packed_with else None,
            samples=[dict(sample) for sample in samples] if samples else None, finished_at=now, heartbeat_at=now,
            status=JobStatus.SUCCEEDED.value, error=None, traceback=None, progress_phase="done",
        )
    )
    if result.rowcount != 1:
        return False
    if points:
        connection.execute(delete(metric_points).where(metric_points.c.job_id == job_id))
        connection.execute(insert(metric_points), points)
    release_dependants(connection, job_id)
    return True


def fail_job(
    connection: Connection,
    job_id: str,
    token: str | None,
    error: str,
    traceback: str | None = None,
    *,
    status: JobStatus = JobStatus.FAILED,
    device: str | None = None,
) -> bool:
    """Finish a job as `failed` (or `cancelled`) with a message; True if written.

    With a token the write is fenced by the claim; without one it applies to any job not
    finished yet (used where no worker holds the job). The jobs waiting for it are skipped in
    the same transaction.
    """
    unfinished = [JobStatus.WAITING.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value]
    where = (
        _fenced(job_id, token)
        if token is not None
        else and_(jobs.c.id == job_id, jobs.c.status.in_(unfinished))
    )
    values: dict[str, Any] = {"status": status.value, "error": error, "traceback": traceback,
                              "finished_at": utcnow(), "progress_phase": None}
    if device is not None:
        values["device"] = device
    if connection.execute(update(jobs).where(where).values(**values)).rowcount != 1:
        return False
    skip_dependants(connection, job_id)
    return True


def release_job(connection: Connection, job_id: str, token: str, error: str) -> bool:
    """Give a claimed job back to the queue after a transient failure; True if released.

    The attempt stays counted, so retries end at the job's attempt limit.
    """
    result = connection.execute(
        update(jobs)
        .where(_fenced(job_id, token), jobs.c.attempts < jobs.c.max_attempts)
        # published_at is cleared: the retry message may fail to go out (the broker is often
        # why the failure was transient); the reaper then re-publishes the job.
        .values(status=JobStatus.QUEUED.value, claim_token=None, error=error, progress_phase=None,
                published_at=None)
    )
    return result.rowcount == 1


def interrupt_job(connection: Connection, job_id: str, token: str, error: str) -> bool:
    """Hand a claimed job back to the queue because its worker is shutting down; True if done.

    Unlike `release_job` the attempt is given back (`attempts - 1`): the attempt limit exists to
    stop a job that kills its worker, and a job that stopped on request, after saving a
    checkpoint, is no evidence of that. Repeated shutdowns are the operator's doing, so they
    cannot loop on their own. `published_at` is cleared until the caller publishes again.
    """
    result = connection.execute(
        update(jobs)
        .where(_fenced(job_id, token))
        .values(status=JobStatus.QUEUED.value, attempts=jobs.c.attempts - 1, claim_token=None, error=error,
                heartbeat_at=None, progress_phase=None, published_at=None)
    )
    return result.rowcount == 1


# --- the reaper's side: jobs whose worker died ----------------------------------------------------


def find_stale_jobs(connection: Connection, stale_after: float, limit: int = 1000) -> list[str]:
    """Ids of `running` jobs whose heartbeat is older than `stale_after` seconds."""
    return list(connection.scalars(
        select(jobs.c.id)
        .where(jobs.c.status == JobStatus.RUNNING.value, _is_stale(stale_after, utcnow()))
        .limit(limit)
    ))


def settle_stale_job(connection: Connection, job_id: str, stale_after: float) -> str | None:
    """Finish a job whose worker died and that must not run again; returns its new status.

    A `running` job with a stale heartbeat becomes `cancelled` if a cancel was requested, or
    `failed` if it has used all its attempts (a job that kills its worker every time must not
    loop forever) or was run in-process by `graftq run` (no queue to re-deliver it). Anything
    else is left alone and None is returned.
    """
    now = utcnow()
    stale_running = and_(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING.value, _is_stale(stale_after, now))
    outcomes = (
        (JobStatus.CANCELLED, jobs.c.cancel_requested.is_(True), "cancelled on request (its worker had stopped)"),
        (JobStatus.FAILED, jobs.c.attempts >= jobs.c.max_attempts, (
            "its worker stopped (killed, crashed or lost its connection) during every attempt; "
            "gave up after the attempt limit. Check the worker logs; a job that exhausts memory "
            "or crashes the process needs a smaller batch_size/max_length or another device"
        )),
        # A job of `graftq run` (no queue) has no message to re-deliver: its process is gone.
        (JobStatus.FAILED, jobs.c.queue.is_(None),
         "the `graftq run` process running it stopped before the job finished; run the batch again"),
    )
    for status, condition, error in outcomes:
        settled = connection.execute(
            update(jobs).where(stale_running, condition)
            .values(status=status.value, finished_at=now, claim_token=None, error=error)
        )
        if settled.rowcount:
            skip_dependants(connection, job_id)
            return status.value
    return None


def requeue_stale_job(connection: Connection, job_id: str, stale_after: float) -> bool:
    """Put a `running` job whose worker died back to `queued` (to be re-published); True if done.

    `published_at` is cleared: the caller publishes a new message and records it with
    `mark_published`; if that fails, `unpublished_queued` finds the job again.

    Only for jobs with attempts left and no cancel request: `settle_stale_job` handles the others.
    """
    result = connection.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING.value, _is_stale(stale_after, utcnow()),
            jobs.c.attempts < jobs.c.max_attempts, jobs.c.cancel_requested.is_(False), jobs.c.queue.is_not(None),
        )
        .values(status=JobStatus.QUEUED.value, claim_token=None, published_at=None, progress_phase=None)
    )
    return result.rowcount == 1
