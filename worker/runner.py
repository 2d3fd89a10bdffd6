"""`graftq run`: execute a batch in this process through the Celery task code, no broker.

The jobs are recorded like submitted ones (with no queue: no worker's reaper re-publishes
them), then each runs through `run_job_task.apply(...)`, the task's own code path (claim,
heartbeat, pipeline, fenced outcome), one after another, every job after the jobs it needs;
a job whose need did not succeed was skipped by that outcome and is reported, not run. A live display shows jobs
done/total, the running job's step, loss and ETA (rich on a terminal; plain lines
otherwise); a summary table follows.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from jobs.batch import Batch
from jobs.display import console, duration, job_eta
from jobs.settings import Settings

if TYPE_CHECKING:
    from db.session import Database

PLAIN_PROGRESS_INTERVAL = 10.0


class _Tracker:
    """What the display shows, read from the database (the task writes progress there)."""

    def __init__(self, database: Database, job_ids: list[str], tasks: list[str], extensions: list[str]):
        self.database = database
        self.job_ids = job_ids
        self.labels = [f"{t} ({e})" for t, e in zip(tasks, extensions)]
        self.current: int | None = None
        self.current_started = 0.0
        self.durations: list[float] = []
        self.finished: dict[str, int] = {}

    def progress(self) -> dict[str, Any] | None:
        if self.current is None:
            return None
        from db.queries import get_job

        with self.database.read() as session:
            job = get_job(session, self.job_ids[self.current])
            if job is None:
                return None
            return {"step": job.progress_step, "total": job.progress_total, "loss": job.progress_loss,
                    "phase": job.progress_phase}

    def line(self) -> str:
        done = sum(self.finished.values())
        total = len(self.job_ids)
        parts = [f"jobs {done}/{total} done"]
        failed = self.finished.get("failed", 0) + self.finished.get("cancelled", 0)
        if failed:
            parts.append(f"{failed} failed/cancelled")
        if self.finished.get("skipped"):
            parts.append(f"{self.finished['skipped']} skipped")
        if self.current is not None:
            elapsed = time.monotonic() - self.current_started
            progress = self.progress() or {}
            step, steps, loss = progress.get("step"), progress.get("total"), progress.get("loss")
            job = f"job {self.current + 1}/{total} {self.labels[self.current]}: {progress.get('phase') or 'setup'}"
            eta = job_eta(step, steps, elapsed)
            if step and steps:
                job += f" step {step}/{steps}"
            if loss is not None:
                job += f" loss {loss:.4g}"
            if eta is not None:
                job += f" eta {duration(eta)}"
            parts.append(job)
            remaining = total - done - 1
            if self.durations and remaining >= 0 and eta is not None:
                mean = sum(self.durations) / len(self.durations)
                parts.append(f"batch eta {duration(eta + remaining * mean)}")
        return " | ".join(parts)


class _PlainDisplay:
    """Lines for logs and pipes: one per job start/end, progress every few seconds."""

    def __init__(self, tracker: _Tracker):
        self.tracker = tracker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _PlainDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _loop(self) -> None:
        last = ""
        while not self._stop.wait(PLAIN_PROGRESS_INTERVAL):
            try:
                line = self.tracker.line()
            except Exception:  # the display must never break the run
                continue
            if line != last:
                click.echo(f"  {line}")
                last = line

    def print(self, text: str) -> None:
        click.echo(text)


class _RichDisplay:
    def __init__(self, tracker: _Tracker):
        from rich.live import Live

        self.tracker = tracker
        self.live = Live(self, console=console(), refresh_per_second=2, transient=True)

    def __rich__(self) -> str:
        try:
            return self.tracker.line()
        except Exception:
            return "..."

    def __enter__(self) -> _RichDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def print(self, text: str) -> None:
        self.live.console.print(text, highlight=False, markup=False)


#: Seconds between looks at a job that waits for a job of another batch (run elsewhere).
WAIT_POLL_INTERVAL = 2.0


def run_batch(batch: Batch, settings: Settings, database: Database, *, interactive: bool | None = None) -> bool:
    """Record `batch` and run its jobs here, each after the jobs it needs; True if every job succeeded.

    A job whose need did not succeed is `skipped` (by that outcome's transaction) and not run.
    Raises SpecError, recording nothing, when a job refers to an earlier job that cannot be used.
    """
    from db.claims import fail_job
    from db.queries import get_job, request_cancel
    from db.tables import JobStatus
    from jobs.celery_app import configure
    from jobs.submit import record_batch

    order = batch.order()
    submitted = record_batch(database, batch, settings, broker=False)
    click.echo(f"batch {submitted.batch_id} ({batch.name}): {len(submitted.job_ids)} jobs, running here; "
               f"artifacts under {settings.artifacts_dir / submitted.batch_id}")
    configure(settings)  # the task reads the database/artifacts settings from the app
    from worker.tasks import run_job_task

    tracker = _Tracker(database, submitted.job_ids, [s.task for s in batch.jobs],
                       [s.extension for s in batch.jobs])
    interactive = sys.stdout.isatty() if interactive is None else interactive
    display: Any = _RichDisplay(tracker) if interactive else _PlainDisplay(tracker)
    total = len(submitted.job_ids)
    interrupted = False
    with display:
        for done, index in enumerate(order):
            job_id = submitted.job_ids[index]
            tracker.current, tracker.current_started = index, time.monotonic()
            result: Any = None
            try:
                status = _wait_until_decided(database, job_id, functools.partial(display.print, (
                    f"[{done + 1}/{total}] job {job_id} {tracker.labels[index]}: waiting for a job of another "
                    "batch it needs (run elsewhere)")))
                if status == JobStatus.QUEUED.value:
                    if not interactive:
                        display.print(f"[{done + 1}/{total}] job {job_id} {tracker.labels[index]}: started")
                    result = run_job_task.apply(args=[job_id], task_id=job_id)
            except KeyboardInterrupt:
                interrupted = True
                with database.begin() as session:
                    # The rest first: a job waiting for this one is cancelled too, not skipped.
                    request_cancel(session, [submitted.job_ids[rest] for rest in order[done + 1:]])
                    fail_job(session, job_id, None, "interrupted (Ctrl-C in graftq run)",
                             status=JobStatus.CANCELLED)
                display.print(f"[{done + 1}/{total}] interrupted: this job and the rest are cancelled")
                break
            ran = status == JobStatus.QUEUED.value
            if ran:
                tracker.durations.append(time.monotonic() - tracker.current_started)
            with database.begin() as session:
                job = get_job(session, job_id)
                assert job is not None
                if job.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
                    # The task itself broke (e.g. the database went away mid-write): say so.
                    fail_job(session, job_id, None,
                             f"the task did not record an outcome: {getattr(result, 'result', None)!r}",
                             getattr(result, "traceback", None))
                    job = get_job(session, job_id)
                    assert job is not None
                status, error = job.status, job.error
            tracker.finished[status] = tracker.finished.get(status, 0) + 1
            detail = f": {error.splitlines()[0][:200]}" if error and status != JobStatus.SUCCEEDED.value else ""
            detail = detail.replace(f": {status}: ", ": ", 1)  # a skipped job's error starts "skipped: "
            took = f" in {duration(tracker.durations[-1])}" if ran else ""
            display.print(f"[{done + 1}/{total}] job {job_id} {tracker.labels[index]}: {status}{took}{detail}")
        tracker.current = None

    _print_summary(database, submitted.job_ids)
    if interrupted:
        return False
    return tracker.finished.get(JobStatus.SUCCEEDED.value, 0) == total


def _wait_until_decided(database: Database, job_id: str, on_wait: Callable[[], None]) -> str:
    """The job's status once it no longer waits (`on_wait()` is called once if it does): the jobs of
    this batch it needs ran before it, but a job of another batch may still be running elsewhere."""
    from db.queries import get_job
    from db.tables import JobStatus

    waited = False
    while True:
        with database.read() as session:
            job = get_job(session, job_id)
        assert job is not None
        if job.status != JobStatus.WAITING.value:
            return job.status
        if not waited:
            on_wait()
            waited = True
        time.sleep(WAIT_POLL_INTERVAL)


def _print_summary(database: Database, job_ids: list[str]) -> None:
    from rich.table import Table

    from db.queries import get_job

    out = console()
    # A narrow terminal gets the columns that matter most rather than unreadable ones.
    wide = out.width >= 130
    columns = ["job", "task", "extension", "kind", "status", "trainable", "train_loss", "eval_loss", "steps",
               "seconds", "saved / error"]
    if not wide:
        columns = ["job", "task", "extension", "status", "train_loss", "saved / error"]
    table = Table(title="summary", title_justify="left")
    for column in columns:
        # Artifacts live under <artifacts>/<batch>/<job>/ (printed above); here only what was saved.
        table.add_column(column, no_wrap=column in {"job", "status"},
                         overflow="fold" if column == "saved / error" else "ellipsis")
    with database.read() as session:
        for job_id in job_ids:
            job = get_job(session, job_id)
            if job is None:
                continue
            if job.status == "succeeded":
                saved = [name for name, path in (("adapter", job.adapter_path), ("layer", job.layer_path)) if path]
                where = "+".join(saved) or "job.json"
            else:
                where = (job.error or "").splitlines()[0][:120] if job.error else "-"
            values = {
                "job": job.id, "task": job.task, "extension": job.extension, "kind": job.kind, "status": job.status,
                "trainable": f"{job.trainable_params:,} ({job.trainable_pct:.3g}%)"
                if job.trainable_params is not None and job.trainable_pct is not None else "-",
                "train_loss": "-" if job.train_loss is None else f"{job.train_loss:.4g}",
                "eval_loss": "-" if job.eval_loss is None else f"{job.eval_loss:.4g}",
                "steps": "-" if job.steps is None else str(job.steps),
                "seconds": "-" if job.train_seconds is None else f"{job.train_seconds:.1f}",
                "saved / error": where,
            }
            table.add_row(*(values[c] for c in columns))
    out.print(table)
