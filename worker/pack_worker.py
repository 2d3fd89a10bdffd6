"""The worker's side of packed training (`graftq worker --pack K`, `graftq run --pack K`).

A worker that claimed a job claims up to K - 1 queued jobs with the same `pack_key` as well and
trains them together (worker.packing). Each keeps its own claim, heartbeat, progress and fenced
outcome, recorded as it leaves the pack with `packed_with` naming the others. The Celery message
of a job claimed this way is still on the broker: delivered later, its claim fails (the job is
running or finished) and it is acknowledged without running. If the worker dies, every job of
the pack is a running job with a stale heartbeat, which the reaper re-queues like any other.

Imports no torch: the lead job's heartbeat starts before the training modules load.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from jobs.spec import JobKind, JobSpec
from worker.errors import JobCancelled, JobInterrupted

log = logging.getLogger(__name__)

#: the objectives a pack can train: one loss per job from the logits (no per-job classifier head)
PACKABLE_OBJECTIVES = ("seq2seq", "causal")


def pack_key(spec: JobSpec) -> tuple | None:
    """What jobs packed together must share; None for a job that always trains alone.

    Packable: a `train` job of extension `lora` with a plain adapter (variant `lora`, init
    `default` or `gaussian`, no `lora.from`), no quantization, no gradient checkpointing, no
    LoRA+, no experiment trackers (`report_to`), no `eval_every`/`early_stopping`, no `eval`
    sets, one device, dtype not float16 (its loss scaler is per model). Jobs pack together
    when they share the base model, objective, device, dtype and max_length; r, alpha, dropout,
    target_modules, data, optimizer, learning rate, schedule, batch size, steps and seed are per job.
    """
    train = spec.train
    if spec.kind != JobKind.TRAIN or spec.extension != "lora" or train is None:
        return None
    lora = spec.lora
    if lora is not None and (lora.variant != "lora" or lora.init not in ("default", "gaussian")
                             or lora.from_ is not None):
        return None
    if spec.quantize or train.gradient_checkpointing or train.loraplus_lr_ratio is not None:
        return None
    if getattr(train, "report_to", None):  # the trackers follow one training loop per process
        return None
    # evaluation during training, eval sets after it and several devices are the lone pipeline's
    if getattr(train, "eval_every", None) or getattr(train, "early_stopping", None) or getattr(spec, "eval", None):
        return None
    resources = getattr(spec, "resources", None)
    if resources is not None and (getattr(resources, "gpus", None) or 1) > 1:
        return None
    if spec.dtype == "float16":
        return None
    if train.objective is not None and train.objective not in PACKABLE_OBJECTIVES:
        return None
    return (spec.base_model, train.objective, spec.device, spec.dtype, train.max_length)



#: the environment variable `graftq worker --pack K` / `graftq run --pack K` sets for the task
PACK_ENV = "GRAFTQ_PACK"
#: queued jobs looked at for a pack (the compatible ones among them are claimed)
CANDIDATES = 200


def pack_size() -> int:
    """Jobs per pack for this process (`--pack`): 1 (no packing) unless GRAFTQ_PACK says more."""
    import os

    try:
        return max(1, int(os.environ.get(PACK_ENV) or 1))
    except ValueError:
        log.warning("%s=%r is not a whole number; jobs run alone", PACK_ENV, os.environ.get(PACK_ENV))
        return 1


def execute_pack(lead: Any, spec: JobSpec, settings: Any, *, eager: bool, size: int) -> str | None:
    """Claim up to `size - 1` queued jobs compatible with the claimed `lead` (a worker.tasks._Claimed)
    and train them all together; returns the lead's final status, or None (nothing was claimed:
    the caller runs the lead alone). Each job's outcome is recorded, fenced by its own claim, as it
    leaves the pack, with `packed_with` naming the others.
    """
    from sqlalchemy.exc import OperationalError

    from worker import tasks
    from worker.errors import TransientError

    key = pack_key(spec)
    if key is None or str(settings.artifacts_dir).startswith("s3:"):  # s3: committed by the lone pipeline
        return None
    # the lead's claim is kept alive while the others are claimed and the training modules load
    lead_beat = tasks._Heartbeat(lead.database, lead.job_id, lead.claim.token, settings.heartbeat_interval)
    lead_beat.start()
    extras = _claim_extras(lead, key, settings, size - 1)
    if not extras:
        lead_beat.stop()
        return None
    members = [(lead, spec), *extras]
    ids = [job.job_id for job, _ in members]
    log.info("job %s: packed with %s", lead.job_id, " ".join(ids[1:]))
    from worker import pipeline

    beats, contexts = [], []
    for job, job_spec in members:
        if job is lead:
            beat = lead_beat
        else:
            beat = tasks._Heartbeat(job.database, job.job_id, job.claim.token, settings.heartbeat_interval)
            beat.start()
        progress = tasks._ProgressWriter(job.database, job.job_id, job.claim.token, beat)
        handing_back = not eager and job.claim.queue is not None
        beats.append(beat)
        contexts.append(pipeline.JobContext(
            job_id=job.job_id, batch_id=job.claim.batch_id, spec=job_spec, artifacts_root=settings.artifacts_dir,
            on_progress=progress, should_cancel=functools.partial(_should_stop, beat, progress, handing_back),
        ))
    statuses: dict[int, str] = {}
    retries: list[BaseException] = []

    def on_done(index: int, outcome: Any) -> None:
        job, beat, ctx = members[index][0], beats[index], contexts[index]
        beat.stop()
        try:
            if isinstance(outcome, pipeline.JobOutcome):
                statuses[index] = tasks._record_success(job, outcome, packed_with=[i for i in ids if i != job.job_id])
            elif isinstance(outcome, JobInterrupted):
                statuses[index] = tasks._hand_back(job, ctx.resume_dir)
            elif isinstance(outcome, JobCancelled):
                statuses[index] = tasks._record_cancel(job, claim_lost=beat.claim_lost)
            elif isinstance(outcome, (TransientError, OperationalError)):
                try:
                    statuses[index] = tasks._record_retry(job, outcome)
                except tasks._Retry as retry:
                    statuses[index] = "retrying"
                    if index == 0:
                        retries.append(retry)  # the lead's own message is retried by Celery
                    else:
                        _publish_again(job)
            elif isinstance(outcome, Exception):
                statuses[index] = tasks._record_failure(job, outcome)
        except Exception as error:  # not recorded: the claim goes stale and the reaper recovers the job
            log.error("job %s: the outcome of its packed run was not recorded: %s", job.job_id, error)

    from worker.packing import run_pack

    try:
        run_pack(contexts, on_done)
    finally:
        for beat in beats:
            beat.stop()
    if retries:
        raise retries[0]
    return statuses.get(0, "skipped")


def _should_stop(beat: Any, progress: Any, handing_back: bool) -> bool:
    from worker.tasks import shutting_down

    if beat.cancel_requested or beat.claim_lost:
        return True
    if handing_back and shutting_down.is_set() and not progress.training_done:
        raise JobInterrupted("the worker is shutting down")
    return False


def _claim_extras(lead: Any, key: tuple, settings: Any, wanted: int) -> list[tuple[Any, JobSpec]]:
    """Claim up to `wanted` queued jobs whose spec has `key`: [(worker.tasks._Claimed, spec)]."""
    from pydantic import ValidationError

    from db.claims import claim_job, pack_candidates
    from worker import tasks

    database = lead.database

    def candidates() -> list[tuple[str, dict]]:
        with database.read() as connection:
            return pack_candidates(connection, lead.job_id, lead.claim.queue, lead.claim.batch_id, CANDIDATES)

    claimed: list[tuple[Any, JobSpec]] = []
    worker = lead.worker or "graftq-pack"
    for job_id, raw in tasks._with_db_retries(candidates):
        if len(claimed) >= wanted:
            break
        try:
            spec = JobSpec.model_validate(raw)
        except ValidationError:
            continue  # claimed alone, its own run records why it is not valid
        if pack_key(spec) != key:
            continue

        def claim(job_id: str = job_id):
            with database.begin() as connection:
                return claim_job(connection, job_id, worker, settings.stale_after)

        try:
            claim_ = tasks._with_db_retries(claim)
        except Exception as error:  # the pack goes on with the jobs it has
            log.warning("job %s: not packed (%s)", job_id, error)
            continue
        if claim_ is not None:
            log.info("job %s (batch %s) claimed by %s, attempt %d, packed with job %s", job_id, claim_.batch_id,
                     worker, claim_.attempts, lead.job_id)
            claimed.append((tasks._Claimed(database, job_id, claim_, worker), spec))
    return claimed


def _publish_again(job: Any) -> None:
    """Publish a job given back to the queue (its earlier message was consumed); the reaper publishes
    it when this fails."""
    from worker import tasks

    if job.claim.queue is None:
        return
    from jobs.submit import publish_jobs

    try:
        sent = publish_jobs(tasks.app, [job.job_id], [job.claim.queue])
        tasks._with_db_retries(lambda: tasks._mark_published(job.database, sent))
    except Exception as error:
        log.warning("job %s: not published again (%s); the reaper will publish it", job.job_id, error)
