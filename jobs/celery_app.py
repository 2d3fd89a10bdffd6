"""The one Celery app of graftq, torch-free, configured from settings.

The submitting side sends tasks by name (`app.send_task(RUN_JOB_TASK, ...)`) and never
imports worker code; `worker/tasks.py` defines the task on this same app, and the worker
processes run `celery -A worker.tasks:app worker ...`.

Routing: a job whose spec asks for a GPU (`device: cuda...`) goes to `graftq.gpu`, one that
asks for the CPU to `graftq.cpu`, any other to `graftq`. A GPU worker consumes
`graftq.gpu,graftq`, a CPU worker `graftq.cpu,graftq`, so a GPU job never lands on a
CPU-only worker.

Priorities: kombu's Redis transport keeps one list per queue and priority step and serves
them in step order, 0 first; graftq's priority p (0-9, 9 the most urgent) is sent as message
priority 9 - p (`message_priority`), with one step per value. A worker process holds at most
one message (prefetch 1, late acknowledgement), so a higher-priority message published while
it runs a job is the next one it takes.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from jobs.settings import Settings, broker_tls
from jobs.spec import MAX_PRIORITY

RUN_JOB_TASK = "graftq.run_job"
#: kombu's Redis transport: the list of queue Q at message priority p > 0 is `Q<sep>p` (kombu's
#: default separator, which no queue name contains); one step per priority value.
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = tuple(range(MAX_PRIORITY + 1))

app = Celery("graftq", set_as_current=False)
_settings: Settings | None = None


def configure(settings: Settings) -> Celery:
    """Apply `settings` to the app (broker, queues, timeouts); returns the app."""
    global _settings
    _settings = settings
    # rediss://: TLS options go to broker_use_ssl, always with the certificate checked; left in the
    # URL, kombu would let them replace broker_use_ssl, and without any it checks nothing.
    broker_url, tls = broker_tls(settings.broker_url)
    app.conf.update(
        broker_url=broker_url,
        broker_use_ssl=tls,
        # The results database is the record of every job; no result backend.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # At-least-once delivery: acknowledge after the task returns, redeliver when the worker
        # process dies. Duplicates are dropped by the claim in the database (docs/reliability.md).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_default_queue=settings.queue,
        task_queues=[Queue(name, routing_key=name) for name in settings.queues],
        task_create_missing_queues=True,
        task_track_started=False,
        # Task events cost every job three extra broker publishes; workers send them only while
        # a monitor asks: Flower does (its enable_events, on by default), and
        # `celery control enable_events` does by hand.
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
        timezone="UTC",
    )
    return app


def transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport options: the visibility timeout, how often workers look for
    messages whose timeout expired (kombu's default sweep runs every 10 x 10 s; a worker restores
    such a message within about a tenth of the timeout, at most 10 s, past it), and one priority
    step per priority value (kombu's default, 0/3/6/9, would lump priorities together).
    """
    timeout = max(1, int(settings.visibility_timeout))
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": max(1, min(10, timeout // 10)),
        "unacked_restore_throttle": 1,
        "priority_steps": list(REDIS_PRIORITY_STEPS),
        "sep": REDIS_PRIORITY_SEP,
    }


def message_priority(priority: int) -> int:
    """The broker message priority of a job of graftq `priority` (kombu's Redis transport serves 0 first)."""
    return MAX_PRIORITY - priority


def current_settings() -> Settings:
    """The settings the app was last configured with (from the environment by default)."""
    if _settings is None:
        configure(Settings.from_env())
    assert _settings is not None
    return _settings


configure(Settings.from_env())
