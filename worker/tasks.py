"""The Celery task: `graftq.run_job(job_id)`. Thin: claim, run the pipeline, record.

Worker processes run `celery -A worker.tasks:app worker ...` (see worker/launcher.py);
`graftq run` executes the same task in-process with `run_job_task.apply(args=[job_id])`.

Exactly-once execution is built on the database row, not on the broker (docs/reliability.md):

1. `_claim`: a conditional UPDATE takes the row (queued, or running with a stale heartbeat,
   and attempts left); a delivery that cannot claim it (finished, or running with a live
   heartbeat elsewhere) is acknowledged without running: that drops duplicates;
2. a heartbeat thread keeps the claim alive and notices cancel requests and a lost claim;
3. every write about the job names the claim token (`_Claimed.write`), so a worker that
   lost its claim writes nothing;
4. `_record_failure`: deterministic failures (`JobError`, any other exception) end the job
   `failed` and are never retried; `_record_retry`: only `TransientError` and lost database
   connections are retried, and the attempt counter in the database bounds them;
   `_record_success`: the outcome's transaction also queues the jobs waiting for this one, and
   `_publish_released` publishes them after the commit (the reaper does, if that is lost);
5. `_hand_back`: on a warm shutdown (SIGTERM/SIGINT: Celery's `worker_shutting_down`) the
   running job saves a checkpoint at its next training step, the claim is handed back
   (`queued`, the attempt not counted) and a new message is published, so another worker
   resumes it from the checkpoint; the shutdown does not wait for the job to end.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import Reject
from celery.signals import worker_init, worker_shutting_down
from celery.utils.log import get_task_logger
from sqlalchemy.exc import OperationalError

from db.claims import (
    Claim,
    ClaimState,
    claim_job,
    fail_job,
    finish_job,
    heartbeat,
    interrupt_job,
    record_progress,
    release_job,
    settle_stale_job,
)
from db.queries import get_job
from db.session import Database, get_database
from db.submission import mark_published
from db.tables import JobStatus
from jobs.celery_app import RUN_JOB_TASK, app, current_settings
from jobs.settings import Settings
from worker.errors import JobCancelled, JobError, JobInterrupted, TransientError, is_sticky_cuda_error

if TYPE_CHECKING:
    from jobs.spec import JobSpec
    from worker.pipeline import JobOutcome

__all__ = ["app", "execute_job", "run_job_task"]

log = get_task_logger(__name__)
T = TypeVar("T")

#: Seconds between progress writes to the database (the last step is always written).
PROGRESS_WRITE_INTERVAL = 1.0


#: Set when this worker process begins a warm shutdown; the running job hands itself back.
shutting_down = threading.Event()


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:  # runs in the signal handler: only set a flag
    shutting_down.set()


@worker_init.connect
def _on_worker_init(**_: Any) -> None:  # the launcher's children: death signal, GPU self-check
    from worker.launcher import child_started

    child_started()


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def run_job_task(self: Any, job_id: str) -> str:
    """Run one job by id; returns the job's final status (`skipped`, `interrupted` when handed back)."""
    if shutting_down.is_set() and not self.request.is_eager:
        # Delivered while this worker stops: back to the queue unclaimed, for another worker.
        raise Reject("the worker is shutting down", requeue=True)
    worker = self.request.hostname or f"local@{socket.gethostname()}"
    from worker.distributed import DevicesBusy, worker_devices

    try:
        # the job is claimed only once its devices are held (a multi-device job's, or this
        # worker's own device, which a multi-device job may be holding)
        with worker_devices(give_up=shutting_down.is_set) as slots:
            return execute_job(job_id, current_settings(), worker=f"{worker}:{os.getpid()}",
                               eager=bool(self.request.is_eager), slots=slots)
    except DevicesBusy as busy:
        raise Reject(str(busy), requeue=True) from None
    except _Retry as retry:
        countdown = min(60.0, 2.0 ** max(0, retry.attempt))
        log.warning("job %s: transient failure, retrying in %.0f s: %s", job_id, countdown, retry.error)
        raise self.retry(exc=retry.error, countdown=countdown, max_retries=None) from None


class _Retry(Exception):
    def __init__(self, error: BaseException, attempt: int):
        super().__init__(str(error))
        self.error = error
        self.attempt = attempt


def _with_db_retries(action: Callable[[], T], tries: int = 4) -> T:
    """Run a short DB transaction, retrying a lost connection a few times with back-off."""
    for attempt in range(tries):
        try:
            return action()
        except OperationalError as error:  # connection lost, server restarting, lock timeout
            if attempt == tries - 1:
                raise
            log.warning("database error (try %d of %d): %s", attempt + 1, tries, error)
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


class _Heartbeat(threading.Thread):
    """Keeps the claim alive; records whether cancel was requested or the claim was lost."""

    def __init__(self, database: Database, job_id: str, token: str, interval: float):
        super().__init__(name=f"graftq-heartbeat-{job_id}", daemon=True)
        self.database = database
        self.job_id = job_id
        self.token = token
        self.interval = interval
        # Cancel requests are looked for more often than the heartbeat is written.
        self.tick = min(interval, 1.0)
        self.cancel_requested = False
        self.claim_lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.tick):
            try:
                with self.database.begin() as session:
                    state: ClaimState = heartbeat(session, self.job_id, self.token)
            except Exception as error:  # keep beating; a stale heartbeat is the consequence
                log.warning("job %s: heartbeat failed: %s", self.job_id, error)
                continue
            self.cancel_requested = state.cancel_requested
            if not state.held:
                self.claim_lost = True
                log.warning("job %s: claim lost (taken over or finished elsewhere); stopping", self.job_id)
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


class _ProgressWriter:
    """`JobContext.on_progress`: writes progress to the row, at most once a second."""

    def __init__(self, database: Database, job_id: str, token: str, beat: _Heartbeat):
        self.database = database
        self.job_id = job_id
        self.token = token
        self.beat = beat
        # the claim already wrote phase "setup" and the claim time: nothing to say for a second
        self.last_write = time.monotonic()
        #: the last training step was reported: what is left (evaluation, saving) is short
        self.training_done = False

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        final = progress.total_steps and progress.step >= progress.total_steps
        self.training_done = self.training_done or bool(final) or progress.phase == "save"
        # Phase changes are throttled too: a short job (a `create` job) would otherwise pay a
        # write transaction for each of its phases.
        if now - self.last_write < PROGRESS_WRITE_INTERVAL and not final:
            return
        self.last_write = now
        loss = None if progress.loss is None else float(progress.loss)
        try:
            with self.database.begin() as session:
                held = record_progress(session, self.job_id, self.token, int(progress.step),
                                       progress.total_steps, loss, progress.phase)
        except Exception as error:  # progress is best effort; the heartbeat thread reports real trouble
            log.warning("job %s: progress not recorded: %s", self.job_id, error)
            return
        if not held:
            self.beat.claim_lost = True


def _tracking(database: Database, job_id: str) -> dict[str, Any]:
    """What the experiment trackers record besides the spec: the job's sweep values and batch name."""
    with database.read() as connection:
        row = get_job(connection, job_id)
    return {"params": dict(row.params or {}), "batch_name": row.batch} if row is not None else {}


def _describe_unclaimable(database: Database, job_id: str, settings: Settings) -> str:
    with database.begin() as session:
        settled = settle_stale_job(session, job_id, settings.stale_after)
        job = get_job(session, job_id)
        if job is None:
            return "no such job in the database"
        if settled:
            return f"its worker died; now {settled} ({job.error})"
        if job.status == JobStatus.RUNNING.value:
            return f"running on {job.worker} with a live heartbeat (a duplicate delivery)"
        if job.status == JobStatus.QUEUED.value and job.attempts >= job.max_attempts:
            fail_job(session, job_id, None, f"gave up after {job.attempts} attempts")
            return "attempt limit reached; marked failed"
        return f"already {job.status}"


@dataclass
class _Claimed:
    """A job this worker holds: every write about it names the claim token (a fenced write)."""

    database: Database
    job_id: str
    claim: Claim
    #: the worker's name, for the claims of the jobs packed with this one
    worker: str | None = None

    def write(self, fn: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
        """Run `fn(connection, job_id, token, ...)`; False (and nothing written) once the claim is lost."""
        def write() -> bool:
            with self.database.begin() as connection:
                return fn(connection, self.job_id, self.claim.token, *args, **kwargs)

        written = _with_db_retries(write)
        if not written:
            log.warning("job %s: claim lost before the outcome was recorded; outcome discarded", self.job_id)
        return written


def execute_job(job_id: str, settings: Settings, *, worker: str, eager: bool = False,
                slots: list[str] | None = None) -> str:
    """Claim and run one job, record its outcome; returns the final status or `skipped`.

    A job on several devices (`resources.gpus`) runs as ranks on `slots` (worker/distributed.py).

    Raises `_Retry` for a transient failure when the job has attempts left.
    """
    database = get_database(settings.database_url)
    claim = _claim(database, job_id, worker, settings)
    if claim is None:
        return "skipped"
    job = _Claimed(database, job_id, claim)
    spec = _load_spec(job)
    if spec is None:
        return JobStatus.FAILED.value
    job.worker = worker
    packed = _run_packed(job, spec, settings, eager)
    if packed is not None:
        return packed

    beat = _Heartbeat(database, job_id, claim.token, settings.heartbeat_interval)
    beat.start()
    progress = _ProgressWriter(database, job_id, claim.token, beat)
    handing_back = not eager and claim.queue is not None

    def should_stop() -> bool:
        if beat.cancel_requested or beat.claim_lost:
            return True
        if handing_back and shutting_down.is_set() and not progress.training_done:
            raise JobInterrupted("the worker is shutting down")
        return False

    context = None
    try:
        from worker import backoff, pipeline

        context = pipeline.JobContext(
            job_id=job_id, batch_id=claim.batch_id, spec=spec, artifacts_root=settings.artifacts_dir,
            on_progress=progress, should_cancel=should_stop,
            # None: the pipeline's own place (stable per job, so a retried attempt resumes there).
            checkpoint_dir=None,
            needed_dirs=_with_db_retries(lambda: pipeline.needed_dirs(spec, database)),
            **(_with_db_retries(lambda: _tracking(database, job_id))
               if spec.train is not None and spec.train.report_to else {}),
        )
        if spec.resources.gpus > 1:  # ranks on the devices this worker holds, backing off the same way
            from worker import distributed

            outcome = backoff.run_job(context, run=functools.partial(distributed.run_job, slots=slots))
        else:
            outcome = backoff.run_job(context)  # pipeline.run_job, with a smaller micro-batch after an OOM
    except JobInterrupted:
        beat.stop()
        assert context is not None
        return _hand_back(job, context.resume_dir)
    except JobCancelled:
        beat.stop()
        return _record_cancel(job, claim_lost=beat.claim_lost)
    except (TransientError, OperationalError) as error:
        beat.stop()
        return _record_retry(job, error)
    except Exception as error:
        beat.stop()
        status = _record_failure(job, error)
        if not eager and is_sticky_cuda_error(error):
            _replace_this_process()
        return status
    beat.stop()
    return _record_success(job, outcome)


def _run_packed(job: _Claimed, spec: JobSpec, settings: Settings, eager: bool) -> str | None:
    """With `--pack K` (K > 1): the job trained together with compatible queued jobs (worker.packing);
    None when it runs alone."""
    from worker.pack_worker import execute_pack, pack_size

    size = pack_size()
    if size <= 1:
        return None
    return execute_pack(job, spec, settings, eager=eager, size=size)


def _claim(database: Database, job_id: str, worker: str, settings: Settings) -> Claim | None:
    """Claim the job's row; None (and the reason logged) when this delivery must not run it."""
    def claim() -> Claim | None:
        with database.begin() as connection:
            return claim_job(connection, job_id, worker, settings.stale_after)

    try:
        claimed = _with_db_retries(claim)
    except OperationalError as error:
        raise _Retry(error, 0) from error
    if claimed is None:
        reason = _with_db_retries(lambda: _describe_unclaimable(database, job_id, settings))
        log.info("job %s not run: %s", job_id, reason)
        return None
    log.info("job %s (batch %s) claimed by %s, attempt %d", job_id, claimed.batch_id, worker, claimed.attempts)
    return claimed


def _load_spec(job: _Claimed) -> JobSpec | None:
    """The stored spec, validated again by this worker's graftq; None (job failed) if it is not valid."""
    from pydantic import ValidationError

    from jobs.errors import describe_validation_error
    from jobs.spec import JobSpec

    try:
        return JobSpec.model_validate(job.claim.spec)
    except ValidationError as error:
        problems = "; ".join(describe_validation_error(error, where=f"job {job.job_id}"))
        job.write(fail_job, f"the stored job spec is not valid for this graftq version: {problems}")
        return None


def _record_success(job: _Claimed, outcome: JobOutcome, packed_with: list[str] | None = None) -> str:
    try:
        written = job.write(
            finish_job, stats=outcome.stats, metrics=outcome.metrics, device=outcome.device, dtype=outcome.dtype,
            packed_with=packed_with,
            versions=outcome.versions, job_dir=str(outcome.job_dir), loss_curve=outcome.loss_curve,
            task_metrics=outcome.task_metrics, samples=outcome.samples, metric_curve=outcome.metric_curve,
            eval_sets=outcome.eval_sets,
            adapter_path=None if outcome.adapter_path is None else str(outcome.adapter_path),
            layer_path=None if outcome.layer_path is None else str(outcome.layer_path),
        )
    except ValueError as error:  # an outcome the database refuses (a non-finite value, an unknown field)
        return _record_failure(job, JobError(f"the job ran but its outcome cannot be recorded: {error}"))
    if not written:
        return "skipped"
    log.info("job %s succeeded", job.job_id)
    _publish_released(job)
    return JobStatus.SUCCEEDED.value


def _publish_released(job: _Claimed) -> None:
    """Publish the jobs that the committed success released (queued, needing this job, no message).

    They are looked up after the commit, so a lost publish (the broker is down, or this process
    dies first) leaves them queued without a message, which the reaper publishes. Jobs of
    `graftq run` have no queue: its runner takes them itself.
    """
    if job.claim.queue is None:
        return
    from db.dependencies import released_unpublished
    from jobs.submit import publish_jobs

    try:
        def look_up() -> list[Any]:
            with job.database.read() as connection:
                return released_unpublished(connection, job.job_id)

        released = _with_db_retries(look_up)
        if not released:
            return
        sent = publish_jobs(app, [row.id for row in released], [row.queue for row in released],
                            [row.priority for row in released])
        _with_db_retries(lambda: _mark_published(job.database, sent))
    except Exception as error:  # the reaper publishes queued jobs that have no message
        log.warning("job %s: the jobs it released were not published (%s); the reaper will publish them",
                    job.job_id, error)
        return
    log.info("job %s: published %d job(s) that were waiting for it: %s", job.job_id, len(sent), " ".join(sent))


def _record_cancel(job: _Claimed, *, claim_lost: bool) -> str:
    if claim_lost:
        log.warning("job %s stopped: its claim was lost", job.job_id)
        return "skipped"
    job.write(fail_job, "cancelled on request", None, status=JobStatus.CANCELLED)
    log.info("job %s cancelled", job.job_id)
    return JobStatus.CANCELLED.value


def _record_retry(job: _Claimed, error: BaseException) -> str:
    """Release the claim for a retry (raises `_Retry`), or fail the job when no attempt is left."""
    if job.write(release_job, f"transient failure, will retry: {error}"):
        raise _Retry(error, job.claim.attempts) from error
    job.write(fail_job, f"transient failure and no attempts left: {error}", _traceback(error))
    return JobStatus.FAILED.value


def _record_failure(job: _Claimed, error: Exception) -> str:
    """A deterministic failure: the job ends `failed`, never retried."""
    if isinstance(error, JobError):
        job.write(fail_job, str(error) or type(error).__name__, _traceback(error))
        log.error("job %s failed: %s", job.job_id, error)
    else:
        job.write(fail_job, f"{type(error).__name__}: {error}", _traceback(error))
        log.error("job %s failed", job.job_id, exc_info=error)
    return JobStatus.FAILED.value


def _replace_this_process() -> None:
    """After a sticky CUDA error the process's CUDA context is broken: a warm shutdown ends it after
    this task, and `graftq worker` starts a fresh process for the next job."""
    log.error("sticky CUDA error: this worker process stops and is replaced")
    os.kill(os.getpid(), signal.SIGTERM)


def _traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def _hand_back(job: _Claimed, resume_dir: Path) -> str:
    """Give an interrupted job back to the queue and publish it again; returns `interrupted`."""
    try:
        step = json.loads((resume_dir / "trainer_state.json").read_text())["step"]
        saved = f"its checkpoint at step {step} is kept"
    except (OSError, ValueError, KeyError):
        saved = "no checkpoint was saved (checkpoint_every: 0, or training had not started)"
    if not job.write(interrupt_job, f"interrupted by a worker shutdown and re-queued; {saved}"):
        return "skipped"
    from db.queries import job_priorities
    from jobs.submit import publish_jobs

    assert job.claim.queue is not None  # only jobs published to a queue are handed back
    try:
        def look_up() -> dict[str, int]:
            with job.database.read() as connection:
                return job_priorities(connection, [job.job_id])

        priority = _with_db_retries(look_up).get(job.job_id, 0)
        sent = publish_jobs(app, [job.job_id], [job.claim.queue], [priority])
        _with_db_retries(lambda: _mark_published(job.database, sent))
    except Exception as error:  # the reaper publishes queued jobs without a message
        log.warning("job %s: handed back but not published again (%s); the reaper will publish it",
                    job.job_id, error)
    log.warning("job %s: the worker is shutting down; %s and the job is back in the queue", job.job_id, saved)
    return "interrupted"


def _mark_published(database: Database, job_ids: list[str]) -> None:
    with database.begin() as session:
        mark_published(session, job_ids)
