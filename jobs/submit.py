"""Submission: record a validated batch in the database, then enqueue one message per job.

Order of operations, and what happens when the broker is down:

1. The broker connection is checked *before* anything is written. If it is down, nothing
   is recorded and `BrokerUnavailable` says so (the common case: Redis not started).
2. All rows are written in one transaction, status `queued`.
3. One message per job is published with `send_task` over one connection, in chunks (on
   Redis, one round trip per chunk), then `published_at` is recorded.
4. If publishing fails midway (the broker went away after step 1), the jobs whose message
   was not sent are marked `failed` with an error that says so and how to resubmit. We
   chose `failed` over deleting the rows (the batch record stays explainable) and over
   `cancelled` (nobody asked for a cancel; `graftq results --status failed` shows them).
   A message whose publish raised may still have reached the broker; its job is `failed`
   in the database, so the worker's claim refuses it: the database is the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.batch import Batch, gc_paused
from jobs.errors import BrokerUnavailable, SpecError
from jobs.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from db.session import Database


@dataclass(frozen=True)
class Submitted:
    batch_id: str
    job_ids: list[str]
    queues: list[str | None]


def check_pool_devices(batch: Batch) -> None:
    """Refuse `device: cuda:N` with N >= 1 (SpecError): on a pool each worker process owns one
    GPU, its `cuda:0`, so `cuda:1` fails on every worker. `cuda:0` means "a GPU worker"."""
    problems = [
        f"job {index} (task {spec.task!r}): key `device`: {spec.device!r} names one GPU of a machine, but a "
        "pool worker owns exactly one GPU: use device: cuda, and choose the GPUs with `graftq worker --gpus` "
        "(`graftq run` sees every GPU and takes cuda:N)"
        for index, spec in enumerate(batch.jobs) if spec.device.startswith("cuda:") and spec.device != "cuda:0"
    ]
    if problems:
        raise SpecError(f"{len(problems)} job(s) name a GPU by number", problems)


def job_rows(batch: Batch, settings: Settings, *, broker: bool = True) -> list[dict[str, Any]]:
    """The rows `db.submission.create_batch` takes for `batch` (queue None when run in-process)."""
    return [
        {
            "task": spec.task,
            "kind": spec.kind.value,
            "extension": spec.extension,
            "base_model": spec.base_model,
            "requested_device": spec.device,
            "queue": settings.queue_for(spec.queue_kind) if broker else None,
            "spec": spec.to_json(),
        }
        for spec in batch.jobs
    ]


def record_batch(database: Database, batch: Batch, settings: Settings, *, broker: bool = True) -> Submitted:
    """Write the batch and its jobs (status queued) in one transaction."""
    from db.submission import create_batch

    rows = job_rows(batch, settings, broker=broker)
    with database.begin() as connection:
        batch_id, job_ids = create_batch(
            connection, batch.name, rows,
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


#: Messages per broker round trip: kombu's `Producer.batch` sends each chunk as one Redis pipeline.
PUBLISH_CHUNK = 500


def publish_jobs(app: Celery, job_ids: Sequence[str], queues: Sequence[str | None]) -> list[str]:
    """Publish one `graftq.run_job` message per job over one connection; returns the ids sent.

    Each message is `app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id)`; a job without
    a queue goes to the default queue (`task_default_queue`). Messages go out in chunks of
    `PUBLISH_CHUNK`, and a chunk counts as sent once the broker took it. Publishing does not
    retry: raises `PublishFailed` (carrying the ids of the chunks sent) as soon as the broker fails.
    """
    from jobs.celery_app import RUN_JOB_TASK

    sent: list[str] = []
    default_queue = app.conf.task_default_queue
    pairs = list(zip(job_ids, queues, strict=True))
    try:
        # A connection of its own, not the app's pool: Celery builds that pool once, for the
        # broker URL of its first use, and would ignore a later `configure` with another URL.
        with app.connection_for_write() as connection, connection.Producer() as producer:
            for start in range(0, len(pairs), PUBLISH_CHUNK):
                chunk = pairs[start : start + PUBLISH_CHUNK]
                with producer.batch(max_size=PUBLISH_CHUNK):
                    for job_id, queue in chunk:
                        # retry=False: Celery's default policy reconnects and retries each publish;
                        # a broker that dies midway should surface at once, as PublishFailed.
                        app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue or default_queue,
                                      ignore_result=True, producer=producer, retry=False)
                sent.extend(job_id for job_id, _ in chunk)
    except Exception as error:  # kombu/redis raise several types; all mean "not (all) sent"
        raise PublishFailed(sent, error) from error
    return sent


class PublishFailed(Exception):
    def __init__(self, sent: list[str], error: BaseException):
        super().__init__(str(error))
        self.sent = sent
        self.error = error


@gc_paused()  # the rows and messages of a big batch all live until the end: no collector passes
def submit_batch(
    batch: Batch, settings: Settings, database: Database, app: Celery | None = None, *, broker_checked: bool = False
) -> Submitted:
    """Record `batch` and enqueue its jobs; returns the ids. Raises BrokerUnavailable.

    `broker_checked`: the caller already ran `check_broker` (the CLI does, before it opens
    the database, so that a down broker leaves no database file behind either).
    """
    from db.submission import fail_unpublished, mark_batch_published, mark_published
    from jobs.celery_app import configure

    check_pool_devices(batch)
    app = app or configure(settings)
    if not broker_checked:
        check_broker(app)
    submitted = record_batch(database, batch, settings)
    try:
        publish_jobs(app, submitted.job_ids, submitted.queues)
    except PublishFailed as failure:
        unsent = submitted.job_ids[len(failure.sent):]
        with database.begin() as connection:
            if failure.sent:
                mark_published(connection, failure.sent)
            fail_unpublished(
                connection, unsent,
                f"not enqueued: the broker failed while the batch was being submitted ({failure.error}); "
                "submit the batch again once the broker is back",
            )
        raise BrokerUnavailable(
            f"the broker at {_redact(app.conf.broker_url)} failed after {len(failure.sent)} of "
            f"{len(submitted.job_ids)} jobs of batch {submitted.batch_id} were enqueued: {failure.error}. "
            f"The other {len(unsent)} jobs are marked failed (not enqueued); submit them again when the "
            "broker is back"
        ) from None
    with database.begin() as connection:
        mark_batch_published(connection, submitted.batch_id)
    return submitted
