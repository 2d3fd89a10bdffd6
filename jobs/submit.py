"""Submission: record a validated batch in the database, then enqueue one message per job.

Order of operations, and what happens when the broker is down:

1. The broker connection is checked *before* anything is written. If it is down, nothing
   is recorded and `BrokerUnavailable` says so (the common case: Redis not started).
2. All rows are written in one transaction, status `queued`, or `waiting` for a job with a
   need that has not succeeded (references to earlier jobs are checked in that transaction).
3. One message per queued job is published with `send_task` over one connection, in chunks (on
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobs.batch import Batch, gc_paused
from jobs.errors import BrokerUnavailable, SpecError
from jobs.settings import Settings
from jobs.spec import JOB_REF_RE, JobSpec

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import Connection

    from db.session import Database


@dataclass(frozen=True)
class Submitted:
    batch_id: str
    job_ids: list[str]
    queues: list[str | None]
    #: jobs recorded `waiting` (a need unmet): no message until the jobs they need succeed
    waiting: frozenset[str] = frozenset()
    #: each job's priority (0-9, higher first); empty: all 0
    priorities: list[int] = field(default_factory=list)

    def to_publish(self) -> tuple[list[str], list[str | None], list[int]]:
        """The ids, queues and priorities of the jobs to publish now (the queued ones), in batch order."""
        priorities = self.priorities or [0] * len(self.job_ids)
        chosen = [(job_id, queue, priority)
                  for job_id, queue, priority in zip(self.job_ids, self.queues, priorities, strict=True)
                  if job_id not in self.waiting]
        return [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen]


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
    """The rows `db.submission.create_batch` takes for `batch` (queue None when run in-process).

    Each row's `priority` (and its stored spec's) is the job's own, else the batch's, else 0.

    Job ids are generated here, so that each row's `needs` lists ids and its stored spec refers
    to other jobs only as `job:ID` (`needs`, `layer.from`, `lora.from`): the worker never sees a
    name. References to jobs recorded earlier are kept as written; `record_batch` checks them
    against the database and stores their full ids.
    """
    from db.submission import new_id

    ids = [new_id() for _ in batch.jobs]
    priorities = batch.priorities()
    rows = []
    for index, spec in enumerate(batch.jobs):
        needs: list[str] = []
        for need in batch.needs[index]:
            needed = ids[need] if isinstance(need, int) else need.removeprefix("job:")
            if needed not in needs:
                needs.append(needed)
        stored = spec.to_json()
        for section in ("layer", "lora"):
            reference = (stored.get(section) or {}).get("from")
            if reference is None:
                continue
            if JOB_REF_RE.fullmatch(reference):
                needed = reference.removeprefix("job:")
            else:
                needed = ids[_named(batch, index, reference)]
            stored[section]["from"] = f"job:{needed}"
            if needed not in needs:
                needs.append(needed)
        stored["needs"] = [f"job:{needed}" for needed in needs]
        stored["priority"] = priorities[index]
        rows.append({
            "id": ids[index],
            "task": spec.task,
            "name": spec.name,
            "params": batch.params[index],
            "kind": spec.kind.value,
            "extension": spec.extension,
            "base_model": spec.base_model,
            "requested_device": spec.device,
            "queue": job_queue(settings, spec) if broker else None,
            "gpus": spec.resources.gpus,
            "spec": stored,
            "needs": needs,
            "priority": priorities[index],
        })
    return rows


def sized_queue(queue: str, gpus: int) -> str:
    """The queue of the jobs of `queue` that run on `gpus` GPUs: `queue` itself for one, else
    `<queue>.gpus-N`, so that only a worker that can gather N devices consumes them."""
    return queue if gpus == 1 else f"{queue}.gpus-{gpus}"


def job_queue(settings: Settings, spec: JobSpec) -> str:
    """The broker queue a job of `spec` is published to (by device kind, then by GPU count)."""
    return sized_queue(settings.queue_for(spec.queue_kind), spec.resources.gpus)


def _named(batch: Batch, index: int, name: str) -> int:
    """The position of the job named `name` that job `index` needs (the parser made it unique)."""
    needed = [need for need in batch.needs[index] if isinstance(need, int) and batch.jobs[need].name == name]
    if len(needed) != 1:
        needed = [position for position, spec in enumerate(batch.jobs) if spec.name == name]
    if len(needed) != 1:
        raise SpecError(f"{_label(batch, index)}: `from: {name}` names {len(needed) or 'no'} job(s) of the batch; "
                        "give one job that name, or refer to a recorded job as job:ID")
    return needed[0]


def _label(batch: Batch, index: int) -> str:
    params = ", ".join(f"{key}={value}" for key, value in batch.params[index].items())
    return f"job {index} (task {batch.jobs[index].task!r}{', ' + params if params else ''})"


#: What a job must save for `<section>.from` to build on it: the section of its extension kind
#: and the artifact column of its row.
_FROM_NEEDS = {"layer": ("a layer", "layer_path"), "lora": ("an adapter", "adapter_path")}


def check_references(connection: Connection, batch: Batch, rows: list[dict[str, Any]]) -> None:
    """Check the jobs recorded earlier that `rows` need, and store their full ids; raises SpecError.

    Each must exist (a unique id prefix is enough), must not have ended failed, cancelled or
    skipped, must have the job's base model, and for `layer.from` / `lora.from` must save a layer /
    an adapter (or have saved one, if it succeeded). The rows are locked until the caller's
    transaction ends, so an outcome recorded meanwhile still sees the new jobs.
    """
    from db.dependencies import needed_jobs
    from db.queries import resolve_id
    from jobs.extensions import EXTENSION_KINDS

    own = {row["id"] for row in rows}
    written = {need for row in rows for need in row["needs"] if need not in own}
    full = {reference: resolve_id(connection, reference) for reference in sorted(written)}
    found = needed_jobs(connection, [job_id for job_id in full.values() if job_id is not None])
    problems = []
    for index, row in enumerate(rows):
        label = _label(batch, index)
        spec = row["spec"]
        keys = {need: "needs" for need in row["needs"]}
        for section in ("layer", "lora"):
            reference = (spec.get(section) or {}).get("from")
            if reference is not None:
                keys[reference.removeprefix("job:")] = f"{section}.from"
        for reference, key in keys.items():
            if reference in own:
                continue
            parent = found.get(full[reference] or "")
            if parent is None:
                problems.append(f"{label}: key `{key}`: no job job:{reference} in the database (give an id that "
                                "`graftq results` shows, or a unique prefix of it of at least 4 characters)")
                continue
            where = f"job:{parent.id} ({parent.task})"
            if parent.status in ("failed", "cancelled", "skipped"):
                problems.append(f"{label}: key `{key}`: {where} ended {parent.status} and will never succeed; "
                                f"retry it (`graftq retry {parent.id}`) or refer to another job")
                continue
            if parent.base_model != row["base_model"]:
                problems.append(f"{label}: key `{key}`: {where} is on base model {parent.base_model!r}, this job "
                                f"on {row['base_model']!r}; use the same base_model")
            if key.endswith(".from"):
                section = key.split(".")[0]
                what, column = _FROM_NEEDS[section]
                kind = EXTENSION_KINDS.get(parent.extension)
                if kind is None or section not in kind.sections:
                    problems.append(f"{label}: key `{key}`: {where} is a {parent.extension} job and saves no "
                                    f"{section}; refer to a job whose extension trains {what}")
                elif parent.status == "succeeded" and getattr(parent, column) is None:
                    problems.append(f"{label}: key `{key}`: {where} succeeded without saving {what}")
    if problems:
        count = len(problems)
        raise SpecError(f"{count} problem{'s' if count > 1 else ''} with the jobs the batch refers to", problems)
    for row in rows:
        row["needs"] = [need if need in own else full[need] for need in row["needs"]]
        spec = row["spec"]
        spec["needs"] = [f"job:{need}" for need in row["needs"]]
        for section in ("layer", "lora"):
            reference = (spec.get(section) or {}).get("from")
            if reference is not None and reference.removeprefix("job:") not in own:
                spec[section]["from"] = f"job:{full[reference.removeprefix('job:')]}"


def record_batch(database: Database, batch: Batch, settings: Settings, *, broker: bool = True) -> Submitted:
    """Write the batch and its jobs in one transaction (`waiting` where a need is unmet, else `queued`).

    Raises SpecError, writing nothing, for a reference to an earlier job that cannot be used.
    """
    from db.dependencies import waiting_in_batch
    from db.submission import create_batch

    rows = job_rows(batch, settings, broker=broker)
    with database.begin() as connection:
        check_references(connection, batch, rows)
        batch_id, job_ids = create_batch(
            connection, batch.name, rows,
            source_path=str(batch.source) if batch.source else None,
            base_model=batch.base_model, max_attempts=settings.max_attempts,
        )
        waiting = frozenset(waiting_in_batch(connection, batch_id)) if any(row["needs"] for row in rows) else frozenset()
    return Submitted(batch_id, job_ids, [row["queue"] for row in rows], waiting, [row["priority"] for row in rows])


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


def publish_jobs(app: Celery, job_ids: Sequence[str], queues: Sequence[str | None],
                 priorities: Sequence[int] | None = None) -> list[str]:
    """Publish one `graftq.run_job` message per job over one connection; returns the ids sent.

    Each message is `app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id)`; a job without
    a queue goes to the default queue (`task_default_queue`). `priorities` are the jobs' graftq
    priorities (0-9, higher first; all 0 if None), sent as the broker's message priority
    (`jobs.celery_app.message_priority`). Messages go out in chunks of
    `PUBLISH_CHUNK`, and a chunk counts as sent once the broker took it. Publishing does not
    retry: raises `PublishFailed` (carrying the ids of the chunks sent) as soon as the broker fails.
    """
    from jobs.celery_app import RUN_JOB_TASK, message_priority

    sent: list[str] = []
    default_queue = app.conf.task_default_queue
    pairs = list(zip(job_ids, zip(queues, priorities or [0] * len(job_ids), strict=True), strict=True))
    try:
        # A connection of its own, not the app's pool: Celery builds that pool once, for the
        # broker URL of its first use, and would ignore a later `configure` with another URL.
        with app.connection_for_write() as connection, connection.Producer() as producer:
            for start in range(0, len(pairs), PUBLISH_CHUNK):
                chunk = pairs[start : start + PUBLISH_CHUNK]
                with producer.batch(max_size=PUBLISH_CHUNK):
                    for job_id, (queue, priority) in chunk:
                        # retry=False: Celery's default policy reconnects and retries each publish;
                        # a broker that dies midway should surface at once, as PublishFailed.
                        app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue or default_queue,
                                      priority=message_priority(priority), ignore_result=True,
                                      producer=producer, retry=False)
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
    job_ids, queues, priorities = submitted.to_publish()
    try:
        publish_jobs(app, job_ids, queues, priorities)
    except PublishFailed as failure:
        unsent = job_ids[len(failure.sent):]
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
            f"{len(job_ids)} jobs of batch {submitted.batch_id} were enqueued: {failure.error}. "
            f"The other {len(unsent)} jobs are marked failed (not enqueued); submit them again when the "
            "broker is back"
        ) from None
    with database.begin() as connection:
        mark_batch_published(connection, submitted.batch_id)
    return submitted
