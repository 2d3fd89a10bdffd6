"""Reading jobs and batches (results, status counts, loss curves, the reaper's look-ups) and cancelling.

Every function takes a `Connection` and never commits: the caller owns the transaction
(`with database.read() as connection:` to read, `database.begin()` for `request_cancel`).
Jobs are returned as `Row`s, whose columns read as attributes (`job.status`).

    with database.read() as connection:
        rows = result_rows(connection, sort="eval_loss", limit=20)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, and_, func, or_, select, update

from db.conditions import Condition, as_number, as_text, mapping_value, metric_name
from db.dependencies import skip_dependants
from db.submission import chunks
from db.tables import (
    RESULT_FIELDS,
    SORTABLE_COLUMNS,
    JobStatus,
    batches,
    job_needs,
    jobs,
    metric_points,
    utcnow,
)

_RESULT_COLUMNS = [batches.c.name.label("batch") if key == "batch" else jobs.c[key] for key in RESULT_FIELDS]
_JOBS_AND_BATCHES = jobs.join(batches, jobs.c.batch_id == batches.c.id)


def get_job(connection: Connection, job_id: str) -> Row[Any] | None:
    """The job's row, with its batch's name as `batch`; None when there is no such job."""
    return connection.execute(
        select(jobs, batches.c.name.label("batch")).select_from(_JOBS_AND_BATCHES).where(jobs.c.id == job_id)
    ).first()


def resolve_id(connection: Connection, prefix: str, *, batch: bool = False) -> str | None:
    """The one job (or batch) id that starts with `prefix` (at least 4 characters), else None."""
    column = batches.c.id if batch else jobs.c.id
    if connection.scalar(select(column).where(column == prefix)) is not None:
        return prefix
    if len(prefix) < 4:
        return None
    matches = list(connection.scalars(select(column).where(column.startswith(prefix, autoescape=True)).limit(2)))
    return matches[0] if len(matches) == 1 else None


def loss_curve(connection: Connection, job_id: str) -> list[tuple[int, str, float]]:
    rows = connection.execute(
        select(metric_points.c.step, metric_points.c.split, metric_points.c.value)
        .where(metric_points.c.job_id == job_id, metric_points.c.metric == "loss")
        .order_by(metric_points.c.split, metric_points.c.step)
    )
    return [(step, split, loss) for step, split, loss in rows]


def metric_curve(connection: Connection, job_id: str) -> dict[str, list[tuple[int, float]]]:
    """{task metric: its (step, value) points on the eval split, by step} for one job."""
    return metric_curves(connection, [job_id]).get(job_id, {})


def metric_curves(connection: Connection, job_ids: Sequence[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{job id: {task metric: its (step, value) points, by step}} for the jobs that have such points."""
    found: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for chunk in chunks(list(job_ids)):
        rows = connection.execute(
            select(metric_points.c.job_id, metric_points.c.metric, metric_points.c.step, metric_points.c.value)
            .where(metric_points.c.job_id.in_(chunk), metric_points.c.metric != "loss")
            .order_by(metric_points.c.job_id, metric_points.c.metric, metric_points.c.step)
        )
        for job_id, metric, step, value in rows:
            found.setdefault(job_id, {}).setdefault(metric, []).append((step, value))
    return found


def batch_job_ids(connection: Connection, batch_id: str) -> list[str]:
    return list(connection.scalars(select(jobs.c.id).where(jobs.c.batch_id == batch_id).order_by(jobs.c.position)))


def jobs_of_batch(connection: Connection, batch_id: str) -> list[Row[Any]]:
    return list(connection.execute(select(jobs).where(jobs.c.batch_id == batch_id).order_by(jobs.c.position)))


def running_jobs(connection: Connection, batch_id: str | None = None) -> list[Row[Any]]:
    """Jobs now `running` (oldest start first), with their progress columns."""
    query = select(jobs).where(jobs.c.status == JobStatus.RUNNING.value).order_by(jobs.c.started_at)
    if batch_id is not None:
        query = query.where(jobs.c.batch_id == batch_id)
    return list(connection.execute(query))


def request_cancel(connection: Connection, job_ids: Sequence[str]) -> dict[str, str]:
    """Cancel jobs: a queued or waiting job is `cancelled` at once (it will never start); a running
    job gets `cancel_requested` and stops at its next step. The jobs waiting for a cancelled one
    are skipped. Returns id -> what happened: `cancelled`, `cancelling`, `already <status>` or
    `not found`.
    """
    now = utcnow()
    outcome: dict[str, str] = {}
    not_started = (JobStatus.QUEUED.value, JobStatus.WAITING.value)
    cancelled: list[str] = []
    for chunk in chunks(list(job_ids)):
        before = dict(connection.execute(select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(chunk))).all())
        cancelled += connection.execute(
            update(jobs)
            .where(jobs.c.id.in_(chunk), jobs.c.status.in_(not_started))
            .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now,
                    error="cancelled on request before it started")
            .returning(jobs.c.id)
        ).scalars()
        connection.execute(
            update(jobs).where(jobs.c.id.in_(chunk), jobs.c.status == JobStatus.RUNNING.value)
            .values(cancel_requested=True)
        )
        for job_id in chunk:
            status = before.get(job_id)
            if status is None:
                outcome[job_id] = "not found"
            elif status in not_started:
                outcome[job_id] = "cancelled"
            elif status == JobStatus.RUNNING.value:
                outcome[job_id] = "cancelling"
            else:
                outcome[job_id] = f"already {status}"
    # After every chunk: a dependant that was itself asked for is cancelled, not skipped.
    skip_dependants(connection, cancelled)
    return outcome


def result_rows(
    connection: Connection,
    *,
    batch: str | None = None,
    task: str | None = None,
    extension: str | None = None,
    status: str | Collection[str] | None = None,
    where: Sequence[Condition] = (),
    limit: int | None = None,
    sort: str = "created_at",
    descending: bool = False,
) -> list[dict[str, Any]]:
    """Result rows (dicts with `RESULT_FIELDS`) filtered and sorted; nulls sort last.

    `batch` matches a batch id or a batch name; `status` is one status or several; every
    `where` condition must hold (those on result fields in SQL, those on params keys on the
    fetched rows, before the limit). Ties are broken by job id (in the same direction). `sort` may
    be a task metric (`metric.accuracy`): those rows are sorted in Python.
    Raises ValueError for a sort field that is not in `SORTABLE_COLUMNS` nor a task metric.
    """
    if metric_name(sort):
        found = result_rows(connection, batch=batch, task=task, extension=extension, status=status, where=where)
        return _sorted_by_metric(found, sort, descending)[:limit]
    if sort not in SORTABLE_COLUMNS:
        raise ValueError(f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE_COLUMNS)} or a task "
                         "metric (e.g. metric.accuracy)")
    column = jobs.c[sort]
    base = select(*_RESULT_COLUMNS).select_from(_JOBS_AND_BATCHES)
    if batch is not None:
        base = base.where(or_(jobs.c.batch_id == batch, batches.c.name == batch))
    if task is not None:
        base = base.where(jobs.c.task == task)
    if extension is not None:
        base = base.where(jobs.c.extension == extension)
    if status is not None:
        base = base.where(jobs.c.status.in_([status] if isinstance(status, str) else list(status)))
    on_params = [condition for condition in where if not condition.on_column]
    for condition in where:
        if condition.on_column:
            base = base.where(condition.clause(connection.dialect.name))
        else:
            # A job without the key never matches: leave those rows in the database.
            name = metric_name(condition.key)
            mapping = jobs.c.params if name is None else jobs.c.metrics
            base = base.where(mapping[condition.key if name is None else name].as_string().is_not(None))
    # Params conditions are checked here, after the query, so the limit waits for them.
    query_limit = None if on_params else limit
    order = column.desc() if descending else column.asc()
    tie = jobs.c.id.desc() if descending else jobs.c.id.asc()
    # Two range scans instead of `ORDER BY col IS NULL, col`, which no index can serve:
    # the non-null values in index order, then (if the limit is not reached) the nulls.
    rows = list(connection.execute(base.where(column.is_not(None)).order_by(order, tie).limit(query_limit)))
    if query_limit is None or len(rows) < query_limit:
        remaining = None if query_limit is None else query_limit - len(rows)
        rows += list(connection.execute(base.where(column.is_(None)).order_by(tie).limit(remaining)))
    found = [dict(row._mapping) for row in rows]
    if on_params:
        found = [row for row in found if all(condition.matches(row) for condition in on_params)][:limit]
    return found


def _sorted_by_metric(rows: list[dict[str, Any]], key: str, descending: bool) -> list[dict[str, Any]]:
    """`rows` by a task metric's value (numbers by value), ties by job id; rows without it last, by id."""
    def value(row: dict[str, Any]) -> tuple[Any, ...]:
        found = mapping_value(row, key)
        number = as_number(found)
        return (0, number) if number is not None else (1, as_text(found))

    present = [row for row in rows if mapping_value(row, key) is not None]
    missing = [row for row in rows if mapping_value(row, key) is None]
    present.sort(key=lambda row: (value(row), row["id"]), reverse=descending)
    missing.sort(key=lambda row: row["id"], reverse=descending)
    return present + missing


def metric_names_in_use(connection: Connection, names: Collection[str]) -> set[str]:
    """Which of the task metric `names` some job of the database has in its `metrics`."""
    return {name for name in names
            if connection.scalar(select(jobs.c.id).where(jobs.c.metrics[name].as_string().is_not(None)).limit(1))}


def param_keys_in_use(connection: Connection, keys: Collection[str]) -> set[str]:
    """Which of `keys` some job of the database has in its `params`."""
    return {key for key in keys
            if connection.scalar(select(jobs.c.id).where(jobs.c.params[key].as_string().is_not(None)).limit(1))}


def specs_without_queue(connection: Connection, job_ids: Sequence[str], statuses: Collection[str]) -> dict[str, Any]:
    """id -> stored spec of those of `job_ids` that have one of `statuses` and no queue (jobs
    recorded by `graftq run`)."""
    found: dict[str, Any] = {}
    for chunk in chunks(list(job_ids)):
        found.update(connection.execute(
            select(jobs.c.id, jobs.c.spec)
            .where(jobs.c.id.in_(chunk), jobs.c.queue.is_(None), jobs.c.status.in_(list(statuses)))).all())
    return found


def skipped_dependants(connection: Connection, job_ids: Sequence[str]) -> list[str]:
    """The `skipped` jobs that need any of `job_ids`, directly or through other skipped jobs."""
    found: list[str] = []
    frontier = list(job_ids)
    seen = set(frontier)
    while frontier:
        step: list[str] = []
        for chunk in chunks(frontier):
            step += [job_id for job_id in connection.scalars(
                select(job_needs.c.job_id).join(jobs, jobs.c.id == job_needs.c.job_id)
                .where(job_needs.c.needed_id.in_(chunk), jobs.c.status == JobStatus.SKIPPED.value)
                .order_by(job_needs.c.job_id)
            ) if job_id not in seen]
        frontier = list(dict.fromkeys(step))
        seen.update(frontier)
        found += frontier
    return found


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


def status_counts(connection: Connection, batch_id: str | None = None, *, last: int = 20) -> list[BatchStatus]:
    """Per-batch job counts by status: one batch, or the `last` most recent batches (newest first)."""
    shown = select(batches.c.id, batches.c.name, batches.c.created_at)
    shown = (shown.where(batches.c.id == batch_id) if batch_id is not None
             else shown.order_by(batches.c.created_at.desc()).limit(last))
    found = {row.id: BatchStatus(row.id, row.name, row.created_at) for row in connection.execute(shown)}
    if found:
        counts = connection.execute(
            select(jobs.c.batch_id, jobs.c.status, func.count())
            .where(jobs.c.batch_id.in_(list(found)))
            .group_by(jobs.c.batch_id, jobs.c.status)
        )
        for bid, status, count in counts:
            found[bid].counts[status] = count
    return sorted(found.values(), key=lambda b: b.created_at, reverse=True)


def unpublished_queued(
    connection: Connection, older_than: float, limit: int = 1000, *, released_older_than: float | None = None,
) -> list[Row[Any]]:
    """`(id, queue, priority)` of broker jobs still `queued` with no published message, queued over `older_than` s ago.

    The time counts from when the job became queued (`queued_at`; rows written before that
    column have their creation time). With `released_older_than`, a job released by the jobs it
    needs (queued after it was created) is returned after that many seconds instead: the worker
    that released it publishes it right after its commit, unlike a submit that may still be
    sending thousands of messages. Jobs run in-process by `graftq run` have no queue and are
    never returned.
    """
    now = utcnow()
    became_queued = func.coalesce(jobs.c.queued_at, jobs.c.created_at)
    due = became_queued < now - dt.timedelta(seconds=older_than)
    if released_older_than is not None:
        released = and_(jobs.c.queued_at > jobs.c.created_at,
                        jobs.c.queued_at < now - dt.timedelta(seconds=released_older_than))
        due = or_(due, released)
    return list(connection.execute(
        select(jobs.c.id, jobs.c.queue, jobs.c.priority)
        .where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.published_at.is_(None), jobs.c.queue.is_not(None),
               due).limit(limit)
    ))


def queued_published_before(connection: Connection, older_than: float, limit: int = 10_000) -> list[Row[Any]]:
    """`(id, queue, priority)` of broker jobs still `queued` whose message was published over `older_than` s ago.

    The reaper compares them with the messages the broker holds, to re-publish lost ones.
    """
    cutoff = utcnow() - dt.timedelta(seconds=older_than)
    return list(connection.execute(
        select(jobs.c.id, jobs.c.queue, jobs.c.priority)
        .where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.queue.is_not(None), jobs.c.published_at.is_not(None),
               jobs.c.published_at < cutoff).limit(limit)
    ))


def job_priorities(connection: Connection, job_ids: Sequence[str]) -> dict[str, int]:
    """{job id: priority} of the given jobs (0-9, higher first); an unknown id is left out."""
    found: dict[str, int] = {}
    for chunk in chunks(list(job_ids)):
        found.update((row.id, row.priority) for row in connection.execute(
            select(jobs.c.id, jobs.c.priority).where(jobs.c.id.in_(chunk))))
    return found


def job_dirs(connection: Connection, job_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """{job id: (status, artifact directory or None)} of the given jobs; an unknown id is left out.

    A job has a directory once it succeeded: what a job built on it (`layer.from`, `lora.from`) loads.
    """
    found: dict[str, tuple[str, str | None]] = {}
    for chunk in chunks(list(job_ids)):
        rows = connection.execute(select(jobs.c.id, jobs.c.status, jobs.c.job_dir).where(jobs.c.id.in_(chunk)))
        found.update((row.id, (row.status, row.job_dir)) for row in rows)
    return found


def find_batches(connection: Connection, reference: str | None = None) -> list[Row[Any]]:
    """`(id, name, created_at)` of the batches whose id or name is `reference`, or whose id starts
    with it (4 characters or more); every batch when it is None. Oldest first."""
    query = select(batches.c.id, batches.c.name, batches.c.created_at)
    if reference is not None:
        matches = or_(batches.c.id == reference, batches.c.name == reference)
        if len(reference) >= 4:
            matches = or_(matches, batches.c.id.startswith(reference, autoescape=True))
        query = query.where(matches)
    return list(connection.execute(query.order_by(batches.c.created_at, batches.c.id)))


def loss_curves(connection: Connection, job_ids: Sequence[str]) -> dict[str, list[tuple[int, str, float]]]:
    """{job id: its loss curve as `loss_curve` returns it} for the jobs that have points."""
    found: dict[str, list[tuple[int, str, float]]] = {}
    for chunk in chunks(list(job_ids)):
        rows = connection.execute(
            select(metric_points.c.job_id, metric_points.c.step, metric_points.c.split, metric_points.c.value)
            .where(metric_points.c.job_id.in_(chunk), metric_points.c.metric == "loss")
            .order_by(metric_points.c.job_id, metric_points.c.split, metric_points.c.step)
        )
        for job_id, step, split, loss in rows:
            found.setdefault(job_id, []).append((step, split, loss))
    return found
