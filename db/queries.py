"""Query functions over the results database.

Every function takes a `Session` and never commits: the caller owns the transaction
(`with database.begin() as session:`). The worker's writes for a job (claim, heartbeat,
progress, and the outcome: finish, fail, release, interrupt) and the submission writes
(`db.submission`) are Core statements and take a Core `Connection` as well (`with
database.transaction() as connection:`); the worker writes its claim and outcome so.

Writes made on behalf of a running job are *fenced*: they name the claim token the worker
got from its claim and change nothing once another worker has taken the job over, so a
worker that lost its claim (it looked dead, the job was re-queued) can never overwrite the
newer attempt's record.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from db.models import Batch, Job, JobStatus, MetricPoint, utcnow
from db.results import RESULT_FIELDS as RESULT_FIELDS  # re-exported: callers import it from here
from db.results import result_rows
from db.submission import chunks as _chunks

# The submission writes live in `db.submission` (Core only, no ORM import for `graftq submit`).
from db.submission import create_batch as create_batch
from db.submission import fail_unpublished as fail_unpublished
from db.submission import mark_batch_published as mark_batch_published
from db.submission import mark_published as mark_published
from db.submission import new_id as new_id
from db.tables import jobs as _jobs
from db.tables import metric_points as _metric_points

STAT_FIELDS = ("base_params", "total_params", "trainable_params", "lora_params", "layer_params", "trainable_pct")
METRIC_FIELDS = ("train_loss", "eval_loss", "steps", "tokens_per_second", "train_seconds", "peak_memory_mb")

# --- the worker's side: claim, heartbeat, progress, finish --------------------------------------


@dataclass(frozen=True)
class ClaimState:
    """What a heartbeat found: whether the claim is still ours, and whether to stop."""

    held: bool
    cancel_requested: bool


def _stale_cutoff(stale_after: float, now: dt.datetime) -> dt.datetime:
    return now - dt.timedelta(seconds=stale_after)


# The shared conditions are written on the Core columns, so that they serve both the ORM
# statements below and the prebuilt Core ones (an ORM attribute would turn those into ORM
# statements, and back onto the slower ORM path).
def _heartbeat_before(cutoff: Any) -> Any:
    """A job whose heartbeat is missing or older than `cutoff` (a time or a bound parameter)."""
    return or_(_jobs.c.heartbeat_at.is_(None), _jobs.c.heartbeat_at < cutoff)


def _is_stale(stale_after: float, now: dt.datetime) -> Any:
    return _heartbeat_before(_stale_cutoff(stale_after, now))


def _fenced(job_id: Any, token: Any) -> Any:
    """The job's row while this claim holds it (`job_id` and `token`: values or bound parameters)."""
    return and_(_jobs.c.id == job_id, _jobs.c.claim_token == token, _jobs.c.status == JobStatus.RUNNING.value)


@dataclass(frozen=True)
class Claim:
    """A claimed job: the claim token and what the worker needs to run the job."""

    token: str
    batch_id: str
    spec: dict[str, Any]
    attempts: int  # this attempt's number
    queue: str | None


# The two writes every job makes, claim and finish, are built once with bound parameters on
# the Core table: constructing an ORM UPDATE and its cache key on each call cost more Python
# time (~0.5 ms each in a worker) than SQLite took to run it. Parameter names carry a `p_`
# prefix, since names of the SET columns are reserved for SQLAlchemy's own parameters.
def _param(name: str) -> Any:
    return bindparam(f"p_{name}", type_=_jobs.c[name].type)


_CLAIM = (
    _jobs.update()
    .where(
        _jobs.c.id == bindparam("p_job_id"),
        _jobs.c.attempts < _jobs.c.max_attempts,
        _jobs.c.cancel_requested.is_(False),
        or_(
            _jobs.c.status == JobStatus.QUEUED.value,
            and_(_jobs.c.status == JobStatus.RUNNING.value,
                 _heartbeat_before(bindparam("p_cutoff", type_=_jobs.c.heartbeat_at.type))),
        ),
    )
    .values(
        status=JobStatus.RUNNING.value, attempts=_jobs.c.attempts + 1, claim_token=bindparam("p_token"),
        worker=bindparam("p_worker"), heartbeat_at=_param("heartbeat_at"), started_at=_param("started_at"),
        finished_at=None, error=None, traceback=None, progress_step=None, progress_total=None,
        progress_loss=None, progress_phase="setup",
    )
    .returning(_jobs.c.batch_id, _jobs.c.spec, _jobs.c.attempts, _jobs.c.queue)
)

#: The columns `finish_job` writes from its arguments, in the statement's parameter names.
_FINISH_COLUMNS = (*STAT_FIELDS, *METRIC_FIELDS, "device", "dtype", "versions", "job_dir", "adapter_path",
                   "layer_path", "finished_at", "heartbeat_at")
_FINISH = (
    _jobs.update()
    .where(_fenced(bindparam("p_job_id"), bindparam("p_token")))
    .values(**{name: _param(name) for name in _FINISH_COLUMNS},
            status=JobStatus.SUCCEEDED.value, error=None, traceback=None, progress_phase="done")
)


def claim_job(session: Session, job_id: str, worker: str, stale_after: float) -> str | None:
    """Claim a job for one attempt; returns a fresh claim token, or None when not claimable.

    See `claim_job_to_run`, which also returns what the job needs.
    """
    claim = claim_job_to_run(session, job_id, worker, stale_after)
    return None if claim is None else claim.token


def claim_job_to_run(session: Session, job_id: str, worker: str, stale_after: float) -> Claim | None:
    """Claim a job for one attempt; returns the `Claim`, or None when not claimable.

    Claimable: `queued`, or `running` with a heartbeat older than `stale_after` seconds (its
    worker died), and fewer attempts than its limit. The claim is one conditional UPDATE, so
    of two workers given the same job exactly one gets a token. Increments `attempts`. The
    UPDATE returns the job's batch, spec, attempt and queue itself (RETURNING: SQLite 3.35+
    and PostgreSQL), so a worker reads nothing else before it starts.
    """
    now = utcnow()
    token = secrets.token_hex(16)
    row = session.execute(_CLAIM, {
        "p_job_id": job_id, "p_cutoff": _stale_cutoff(stale_after, now), "p_token": token, "p_worker": worker,
        "p_heartbeat_at": now, "p_started_at": now,
    }).first()
    if row is None:
        return None
    batch_id, spec, attempts, queue = row
    return Claim(token=token, batch_id=batch_id, spec=spec, attempts=attempts, queue=queue)


def settle_stale_job(session: Session, job_id: str, stale_after: float) -> str | None:
    """Finish a job whose worker died and that must not run again; returns its new status.

    A `running` job with a stale heartbeat becomes `cancelled` if a cancel was requested, or
    `failed` if it has used all its attempts (a job that kills its worker every time must not
    loop forever) or was run in-process by `graftq run` (no queue to re-deliver it). Anything
    else is left alone and None is returned.
    """
    now = utcnow()
    stale_running = and_(Job.id == job_id, Job.status == JobStatus.RUNNING.value, _is_stale(stale_after, now))
    cancelled = session.execute(
        update(Job)
        .where(stale_running, Job.cancel_requested.is_(True))
        .values(status=JobStatus.CANCELLED.value, finished_at=now, claim_token=None,
                error="cancelled on request (its worker had stopped)")
        .execution_options(synchronize_session=False)
    )
    if cancelled.rowcount:
        return JobStatus.CANCELLED.value
    failed = session.execute(
        update(Job)
        .where(stale_running, Job.attempts >= Job.max_attempts)
        .values(
            status=JobStatus.FAILED.value, finished_at=now, claim_token=None,
            error=(
                "its worker stopped (killed, crashed or lost its connection) during every attempt; "
                "gave up after the attempt limit. Check the worker logs; a job that exhausts memory "
                "or crashes the process needs a smaller batch_size/max_length or another device"
            ),
        )
        .execution_options(synchronize_session=False)
    )
    if failed.rowcount:
        return JobStatus.FAILED.value
    # A job of `graftq run` (no queue) has no message to re-deliver: its process is gone.
    orphaned = session.execute(
        update(Job)
        .where(stale_running, Job.queue.is_(None))
        .values(status=JobStatus.FAILED.value, finished_at=now, claim_token=None,
                error="the `graftq run` process running it stopped before the job finished; run the batch again")
        .execution_options(synchronize_session=False)
    )
    return JobStatus.FAILED.value if orphaned.rowcount else None


def find_stale_jobs(session: Session, stale_after: float, limit: int = 1000) -> list[str]:
    """Ids of `running` jobs whose heartbeat is older than `stale_after` seconds."""
    now = utcnow()
    return list(session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.RUNNING.value, _is_stale(stale_after, now))
        .limit(limit)
    ))


def requeue_stale_job(session: Session, job_id: str, stale_after: float) -> bool:
    """Put a `running` job whose worker died back to `queued` (to be re-published); True if done.

    `published_at` is cleared: the caller publishes a new message and records it with
    `mark_published`; if that fails, `unpublished_queued` finds the job again.

    Only for jobs with attempts left and no cancel request: `settle_stale_job` handles the others.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id, Job.status == JobStatus.RUNNING.value, _is_stale(stale_after, now),
            Job.attempts < Job.max_attempts, Job.cancel_requested.is_(False), Job.queue.is_not(None),
        )
        .values(status=JobStatus.QUEUED.value, claim_token=None, published_at=None, progress_phase=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def heartbeat(session: Session, job_id: str, token: str) -> ClaimState:
    """Refresh the claim's heartbeat; says whether the claim is still held and if cancel was asked."""
    result = session.execute(
        update(Job).where(_fenced(job_id, token)).values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return ClaimState(held=result.rowcount == 1, cancel_requested=bool(cancel))


def record_progress(
    session: Session, job_id: str, token: str, step: int, total: int | None,
    loss: float | None, phase: str | None = None,
) -> bool:
    """Write the running job's progress; returns False when the claim is no longer held."""
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, token))
        .values(progress_step=step, progress_total=total, progress_loss=loss, progress_phase=phase,
                heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def finish_job(
    session: Session,
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
) -> bool:
    """Record a succeeded job (statistics, metrics, paths, loss curve) if the claim is held.

    Returns False, writing nothing, when another attempt owns the job now.
    """
    now = utcnow()
    params: dict[str, Any] = {f"p_{key}": stats.get(key) for key in STAT_FIELDS}
    params.update({f"p_{key}": metrics.get(key) for key in METRIC_FIELDS})
    params.update(
        p_job_id=job_id, p_token=token, p_device=device, p_dtype=dtype,
        p_versions=dict(versions) if versions is not None else None, p_job_dir=job_dir,
        p_adapter_path=adapter_path, p_layer_path=layer_path, p_finished_at=now, p_heartbeat_at=now,
    )
    result = session.execute(_FINISH, params)
    if result.rowcount != 1:
        return False
    points = [
        {"job_id": job_id, "step": int(step), "split": str(split), "loss": float(loss)}
        for step, split, loss in loss_curve
    ]
    if points:
        session.execute(_metric_points.delete().where(_metric_points.c.job_id == job_id))
        session.execute(insert(_metric_points), points)
    return True


def fail_job(
    session: Session,
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
    finished yet (used where no worker holds the job).
    """
    now = utcnow()
    where = (
        _fenced(job_id, token)
        if token is not None
        else and_(Job.id == job_id, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
    )
    values: dict[str, Any] = {"status": status.value, "error": error, "traceback": traceback,
                              "finished_at": now, "progress_phase": None}
    if device is not None:
        values["device"] = device
    result = session.execute(update(Job).where(where).values(**values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def release_job(session: Session, job_id: str, token: str, error: str) -> bool:
    """Give a claimed job back to the queue after a transient failure; True if released.

    The attempt stays counted, so retries end at the job's attempt limit.
    """
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, token), Job.attempts < Job.max_attempts)
        # published_at is cleared: the retry message may fail to go out (the broker is often
        # why the failure was transient); the reaper then re-publishes the job.
        .values(status=JobStatus.QUEUED.value, claim_token=None, error=error, progress_phase=None,
                published_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def interrupt_job(session: Session, job_id: str, token: str, error: str) -> bool:
    """Hand a claimed job back to the queue because its worker is shutting down; True if done.

    Unlike `release_job` the attempt is given back (`attempts - 1`): the attempt limit exists to
    stop a job that kills its worker (RELIABILITY.md 4), and a job that stopped on request, after
    saving a checkpoint, is no evidence of that. Repeated shutdowns are the operator's doing, so
    they cannot loop on their own. `published_at` is cleared until the caller publishes again.
    """
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, token))
        .values(status=JobStatus.QUEUED.value, attempts=Job.attempts - 1, claim_token=None, error=error,
                heartbeat_at=None, progress_phase=None, published_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


# --- reading and cancelling ----------------------------------------------------------------------


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def get_batch(session: Session, batch_id: str) -> Batch | None:
    return session.get(Batch, batch_id)


def resolve_id(session: Session, prefix: str, *, batch: bool = False) -> str | None:
    """The one job (or batch) id that starts with `prefix` (at least 4 characters), else None."""
    model = Batch if batch else Job
    exact = session.get(model, prefix)
    if exact is not None:
        return exact.id
    if len(prefix) < 4:
        return None
    matches = list(session.scalars(select(model.id).where(model.id.startswith(prefix, autoescape=True)).limit(2)))
    return matches[0] if len(matches) == 1 else None


def loss_curve(session: Session, job_id: str) -> list[tuple[int, str, float]]:
    rows = session.execute(
        select(MetricPoint.step, MetricPoint.split, MetricPoint.loss)
        .where(MetricPoint.job_id == job_id).order_by(MetricPoint.split, MetricPoint.step)
    )
    return [(step, split, loss) for step, split, loss in rows]


def batch_job_ids(session: Session, batch_id: str) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.position)))


def request_cancel(session: Session, job_ids: Sequence[str]) -> dict[str, str]:
    """Cancel jobs: a queued job is `cancelled` at once (it will never start); a running job
    gets `cancel_requested` and stops at its next step. Returns id -> what happened:
    `cancelled`, `cancelling`, `already <status>` or `not found`.
    """
    now = utcnow()
    outcome: dict[str, str] = {}
    for chunk in _chunks(list(job_ids)):
        before = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(chunk))).all())
        session.execute(
            update(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now,
                    error="cancelled on request before it started")
            .execution_options(synchronize_session=False)
        )
        session.execute(
            update(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.RUNNING.value)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
        for job_id in chunk:
            status = before.get(job_id)
            if status is None:
                outcome[job_id] = "not found"
            elif status == JobStatus.QUEUED.value:
                outcome[job_id] = "cancelled"
            elif status == JobStatus.RUNNING.value:
                outcome[job_id] = "cancelling"
            else:
                outcome[job_id] = f"already {status}"
    return outcome


def results(session: Session, **filters: Any) -> list[dict[str, Any]]:
    """Result rows (dicts with `RESULT_FIELDS`) filtered and sorted; nulls sort last.

    The query lives in `db.results.result_rows` (Core, so the CLI can run it without the ORM);
    this is its Session-side name. Takes its keyword filters; raises ValueError for a sort field
    that is not in `SORTABLE_COLUMNS`.
    """
    return result_rows(session, **filters)


@dataclass
class BatchStatus:
    """Counts by status of one batch."""

    batch_id: str
    name: str
    created_at: dt.datetime
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in JobStatus if s.finished)


def status_counts(session: Session, batch_id: str | None = None, *, last: int = 20) -> list[BatchStatus]:
    """Per-batch job counts by status: one batch, or the `last` most recent batches (newest first)."""
    batches = select(Batch).order_by(Batch.created_at.desc()).limit(last)
    if batch_id is not None:
        batches = select(Batch).where(Batch.id == batch_id)
    found = {b.id: BatchStatus(b.id, b.name, b.created_at) for b in session.scalars(batches)}
    if found:
        counts = session.execute(
            select(Job.batch_id, Job.status, func.count())
            .where(Job.batch_id.in_(list(found)))
            .group_by(Job.batch_id, Job.status)
        )
        for bid, status, count in counts:
            found[bid].counts[status] = count
    return sorted(found.values(), key=lambda b: b.created_at, reverse=True)


def running_jobs(session: Session, batch_id: str | None = None) -> list[Job]:
    """Jobs now `running` (oldest start first), with their progress columns."""
    query = select(Job).where(Job.status == JobStatus.RUNNING.value).order_by(Job.started_at)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    return list(session.scalars(query))


def jobs_of_batch(session: Session, batch_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.position)))


def unpublished_queued(session: Session, older_than: float, limit: int = 1000) -> list[Job]:
    """Broker jobs still `queued` with no published message, created over `older_than` s ago.

    Jobs run in-process by `graftq run` have no queue and are never returned.
    """
    cutoff = utcnow() - dt.timedelta(seconds=older_than)
    return list(session.scalars(
        select(Job).where(Job.status == JobStatus.QUEUED.value, Job.published_at.is_(None),
                          Job.queue.is_not(None), Job.created_at < cutoff).limit(limit)
    ))


def queued_published_before(session: Session, older_than: float, limit: int = 10_000) -> list[Job]:
    """Broker jobs still `queued` whose message was published over `older_than` seconds ago.

    The reaper compares them with the messages the broker holds, to re-publish lost ones.
    """
    cutoff = utcnow() - dt.timedelta(seconds=older_than)
    return list(session.scalars(
        select(Job).where(Job.status == JobStatus.QUEUED.value, Job.queue.is_not(None),
                          Job.published_at.is_not(None), Job.published_at < cutoff).limit(limit)
    ))
