"""Submission: record a validated batch in the database, then enqueue one message per job.

Order of operations, and what happens when the broker is down:

1. The broker connection is checked *before* anything is written. If it is down, nothing
   is recorded and `BrokerUnavailable` says so (the common case: Redis not started).
2. All rows are written in one transaction, status `queued`.
3. Messages are published by task name over one producer/connection (one round trip per
   message, no pool checkout per message), then `published_at` is recorded.
4. If publishing fails midway (the broker went away after step 1), the jobs whose message
   was not sent are marked `failed` with an error that says so and how to resubmit. We
   chose `failed` over deleting the rows (the batch record stays explainable) and over
   `cancelled` (nobody asked for a cancel; `graftq results --status failed` shows them).
   A message whose publish raised may still have reached the broker; its job is `failed`
   in the database, so the worker's claim refuses it: the database is the record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.batch import Batch
from jobs.errors import BrokerUnavailable
from jobs.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from db.session import Database


@dataclass(frozen=True)
class Submitted:
    batch_id: str
    job_ids: list[str]
    queues: list[str | None]


def job_rows(batch: Batch, settings: Settings, *, broker: bool = True) -> list[dict[str, Any]]:
    """The rows `db.queries.create_batch` takes for `batch` (queue None when run in-process)."""
    return [
        {
            "task": spec.task,
            "kind": spec.kind.value,
            "extension": spec.extension.value,
            "base_model": spec.base_model,
            "requested_device": spec.device,
            "queue": settings.queue_for(spec.queue_kind) if broker else None,
            "spec": spec.to_json(),
        }
        for spec in batch.jobs
    ]


def record_batch(database: Database, batch: Batch, settings: Settings, *, broker: bool = True) -> Submitted:
    """Write the batch and its jobs (status queued) in one transaction."""
    from db.queries import create_batch

    rows = job_rows(batch, settings, broker=broker)
    with database.begin() as session:
        batch_id, job_ids = create_batch(
            session, batch.name, rows,
            source_path=str(batch.source) if batch.source else None,
            base_model=batch.base_model, max_attempts=settings.max_attempts,
        )
    return Submitted(batch_id, job_ids, [row["queue"] for row in rows])


def check_broker(app: Celery, timeout: float = 5.0) -> None:
    """Raise BrokerUnavailable unless the broker answers within about `timeout` seconds."""
    from kombu.exceptions import OperationalError

    url = app.conf.broker_url
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2, timeout=timeout)
            # Redis connects lazily; a channel makes it really talk to the server.
            _ = connection.default_channel
    except (OperationalError, OSError) as error:
        raise BrokerUnavailable(
            f"cannot reach the broker at {_redact(url)}: {error}. Nothing was recorded or enqueued; "
            "start the broker (e.g. `redis-server`) or pass --broker-url / GRAFTQ_BROKER_URL, then "
            "submit again (or use `graftq run` to run the batch here without a broker)"
        ) from None


def _redact(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


#: Messages per Redis pipeline flush when the transport can batch (kombu >= 5.7, Redis).
PUBLISH_CHUNK = 500


def publish_jobs(app: Celery, job_ids: Sequence[str], queues: Sequence[str | None]) -> list[str]:
    """Publish one `graftq.run_job` message per job over one producer; returns the ids sent.

    Messages go out in chunks: where kombu can batch publishes (`Producer.batch`, Redis),
    each chunk is one pipelined round trip instead of one per message; a chunk counts as
    sent once its flush returned. Raises `PublishFailed` (carrying the ids of the chunks
    already sent) when the broker fails midway.
    """
    from jobs.celery_app import RUN_JOB_TASK

    sent: list[str] = []
    pairs = list(zip(job_ids, queues, strict=True))
    try:
        with app.producer_or_acquire() as producer:
            batching = hasattr(producer, "batch")
            for start in range(0, len(pairs), PUBLISH_CHUNK):
                chunk = pairs[start : start + PUBLISH_CHUNK]
                with producer.batch(max_size=len(chunk) + 1) if batching else contextlib.nullcontext():
                    for job_id, queue in chunk:
                        app.send_task(
                            RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue, producer=producer,
                            ignore_result=True,
                        )
                sent.extend(job_id for job_id, _ in chunk)
    except Exception as error:  # kombu/redis raise several types; all mean "not (all) sent"
        raise PublishFailed(sent, error) from error
    return sent


class PublishFailed(Exception):
    def __init__(self, sent: list[str], error: BaseException):
        super().__init__(str(error))
        self.sent = sent
        self.error = error


def submit_batch(
    batch: Batch, settings: Settings, database: Database, app: Celery | None = None, *, broker_checked: bool = False
) -> Submitted:
    """Record `batch` and enqueue its jobs; returns the ids. Raises BrokerUnavailable.

    `broker_checked`: the caller already ran `check_broker` (the CLI does, before it opens
    the database, so that a down broker leaves no database file behind either).
    """
    from db.queries import fail_unpublished, mark_published
    from jobs.celery_app import configure

    app = app or configure(settings)
    if not broker_checked:
        check_broker(app)
    submitted = record_batch(database, batch, settings)
    try:
        sent = publish_jobs(app, submitted.job_ids, submitted.queues)
    except PublishFailed as failure:
        unsent = submitted.job_ids[len(failure.sent):]
        with database.begin() as session:
            if failure.sent:
                mark_published(session, failure.sent)
            fail_unpublished(
                session, unsent,
                f"not enqueued: the broker failed while the batch was being submitted ({failure.error}); "
                "submit the batch again once the broker is back",
            )
        raise BrokerUnavailable(
            f"the broker at {_redact(app.conf.broker_url)} failed after {len(failure.sent)} of "
            f"{len(submitted.job_ids)} jobs of batch {submitted.batch_id} were enqueued: {failure.error}. "
            f"The other {len(unsent)} jobs are marked failed (not enqueued); submit them again when the "
            "broker is back"
        ) from None
    with database.begin() as session:
        mark_published(session, sent)
    return submitted
