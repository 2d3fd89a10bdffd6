"""Submission: record a validated batch in the database, then enqueue one message per job.

Order of operations, and what happens when the broker is down:

1. The broker connection is checked *before* anything is written. If it is down, nothing
   is recorded and `BrokerUnavailable` says so (the common case: Redis not started).
2. All rows are written in one transaction, status `queued`.
3. Messages are published over one connection, built from one Celery protocol-2 template
   (`TaskMessages`) and sent in chunks (on Redis, one round trip per chunk), then
   `published_at` is recorded.
4. If publishing fails midway (the broker went away after step 1), the jobs whose message
   was not sent are marked `failed` with an error that says so and how to resubmit. We
   chose `failed` over deleting the rows (the batch record stays explainable) and over
   `cancelled` (nobody asked for a cancel; `graftq results --status failed` shows them).
   A message whose publish raised may still have reached the broker; its job is `failed`
   in the database, so the worker's claim refuses it: the database is the record.
"""

from __future__ import annotations

import base64
import json
import re
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


#: Messages per broker round trip (one LPUSH per queue on Redis).
PUBLISH_CHUNK = 500


class TaskMessages:
    """Celery protocol-2 messages of `graftq.run_job`, one per job id, built from one template.

    `app.send_task` rebuilds every header, routing decision and declaration for each message
    (~0.25 ms each: most of a 10,000-job submit); the messages of a batch differ only in the
    job id. The template comes from Celery's own `app.amqp.as_task_v2`, so a message is
    exactly what `send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, ignore_result=True)`
    sends, and a stock Celery worker consumes it.
    """

    def __init__(self, app: Celery):
        from kombu.entity import maybe_delivery_mode

        from jobs.celery_app import RUN_JOB_TASK

        template_id = "0" * 16
        headers, properties, body, _ = app.amqp.as_task_v2(
            template_id, RUN_JOB_TASK, args=[template_id], ignore_result=True, reply_to=app.thread_oid
        )
        self.headers = headers
        # What send_task adds: the delivery mode of the default exchange (persistent).
        self.properties = {**properties, "delivery_mode": maybe_delivery_mode(app.conf.task_default_delivery_mode)}
        self.embed = body[2]
        self.content_type = "application/json"
        self.content_encoding = "utf-8"

    def headers_for(self, job_id: str) -> dict[str, Any]:
        return {**self.headers, "id": job_id, "root_id": job_id, "argsrepr": repr([job_id])}

    def body_for(self, job_id: str) -> str:
        return json.dumps([[job_id], {}, self.embed])

    def properties_for(self, job_id: str) -> dict[str, Any]:
        return {**self.properties, "correlation_id": job_id}


def _redis_channel(producer: Any) -> Any | None:
    """The producer's kombu Redis channel, or None on another transport."""
    try:
        from kombu.transport.redis import Channel
    except ImportError:  # pragma: no cover - the redis client is a dependency
        return None
    channel = producer.channel
    return channel if isinstance(channel, Channel) and not channel._expires else None


class _RedisEnvelopes:
    """The JSON that kombu's Redis transport stores for a message, per job, from one template.

    The template is kombu's own envelope (`prepare_message` + `_inplace_augment_message`, as
    `basic_publish` builds it) around a message with marker values, serialized once; a job's
    message is that text with its id, its base64 body and a fresh delivery tag filled in.
    """

    _MARKERS = {"id": "@@graftq-job-id@@", "body": "@@graftq-body@@", "tag": "@@graftq-delivery-tag@@"}

    def __init__(self, channel: Any, messages: TaskMessages, queue: str):
        from kombu.utils.json import dumps

        marker = self._MARKERS
        message = channel.prepare_message(
            "", 0, messages.content_type, messages.content_encoding,
            messages.headers_for(marker["id"]), messages.properties_for(marker["id"]),
        )
        channel._inplace_augment_message(message, "", queue)
        if message["properties"].get("body_encoding") != "base64":  # pragma: no cover - kombu's Redis default
            raise RuntimeError("kombu's Redis transport no longer base64-encodes bodies; publish through kombu")
        message["body"] = marker["body"]
        message["properties"]["delivery_tag"] = marker["tag"]
        self.parts = re.split("(" + "|".join(map(re.escape, marker.values())) + ")", dumps(message))
        self.messages = messages

    def render(self, job_id: str) -> str:
        from kombu.utils.uuid import uuid

        values = {
            self._MARKERS["id"]: json.dumps(job_id)[1:-1],
            self._MARKERS["body"]: base64.b64encode(self.messages.body_for(job_id).encode()).decode(),
            self._MARKERS["tag"]: uuid(),
        }
        return "".join(values.get(part, part) for part in self.parts)


def _send_chunk_redis(channel: Any, envelopes: dict[str, _RedisEnvelopes], chunk: Sequence[tuple[str, str]]) -> None:
    """One round trip for a chunk: an LPUSH per queue, in one MULTI/EXEC (all or none).

    This replaces kombu's per-message `LPUSH` (its `_put`, priority 0); several values per
    LPUSH keep their order. Should the client replay a chunk after a lost reply, the
    duplicates are harmless: the worker's claim in the database runs each job once.
    """
    by_key: dict[str, list[str]] = {}
    for job_id, queue in chunk:
        by_key.setdefault(channel._q_for_pri(queue, 0), []).append(envelopes[queue].render(job_id))
    with channel.conn_or_acquire() as client, client.pipeline(transaction=True) as pipeline:
        for key, payloads in by_key.items():
            pipeline.lpush(key, *payloads)
        pipeline.execute()


def _send_chunk(producer: Any, messages: TaskMessages, chunk: Sequence[tuple[str, str]]) -> None:
    """Any other transport: kombu's ordinary publish, one message at a time."""
    for job_id, queue in chunk:
        producer.publish(
            messages.body_for(job_id), exchange="", routing_key=queue, content_type=messages.content_type,
            content_encoding=messages.content_encoding, headers=messages.headers_for(job_id),
            retry=False, **messages.properties_for(job_id),
        )


def publish_jobs(app: Celery, job_ids: Sequence[str], queues: Sequence[str | None]) -> list[str]:
    """Publish one `graftq.run_job` message per job over one connection; returns the ids sent.

    Messages go out in chunks of `PUBLISH_CHUNK`; on Redis a chunk is one round trip that
    enqueues all of it or none of it, and counts as sent once it returned. A job without a
    queue goes to the default queue (`task_default_queue`), as with `send_task`. Raises
    `PublishFailed` (carrying the ids of the chunks already sent) when the broker fails midway.
    """
    sent: list[str] = []
    default_queue = app.conf.task_default_queue
    pairs = [(job_id, queue or default_queue) for job_id, queue in zip(job_ids, queues, strict=True)]
    names = list(dict.fromkeys(queue for _, queue in pairs))
    try:
        messages = TaskMessages(app)
        # A connection of its own, not the app's pool: Celery builds that pool once, for the
        # broker URL of its first use, and would ignore a later `configure` with another URL.
        with app.connection_for_write() as connection, connection.Producer() as producer:
            # Declared once each, as send_task would before its first message to a queue.
            for name in names:
                producer.maybe_declare(app.amqp.queues[name])
            channel = _redis_channel(producer)
            if channel is not None:
                envelopes = {name: _RedisEnvelopes(channel, messages, name) for name in names}
            for start in range(0, len(pairs), PUBLISH_CHUNK):
                chunk = pairs[start : start + PUBLISH_CHUNK]
                if channel is not None:
                    _send_chunk_redis(channel, envelopes, chunk)
                else:
                    _send_chunk(producer, messages, chunk)
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
