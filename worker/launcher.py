"""`graftq worker`: start and supervise one Celery worker process per GPU (or one CPU worker).

Each child is `python -m celery -A worker.tasks:app worker --pool solo --concurrency 1
--prefetch-multiplier 1 -Q <queues> -n graftq-gpu<N>@%h` with `CUDA_VISIBLE_DEVICES=N`:
one job at a time per GPU, and the parent never touches CUDA (GPUs are listed with
`nvidia-smi -L`), so nothing CUDA-related is inherited across a fork.

The parent
- forwards SIGTERM/SIGINT to the children (warm shutdown: a running job saves a checkpoint
  at its next training step and is handed back to the queue, so another worker resumes it;
  a second signal kills them, and their jobs are recovered like a dead worker's) and exits
  when they have exited;
- restarts a child that exits on its own (a sticky CUDA error ends the process on
  purpose), giving up after `max_restarts` quick exits in a row;
- runs the reaper: jobs whose heartbeat went stale (their worker was killed) are
  re-queued and re-published, or failed once out of attempts, within
  `stale_after + reap_interval` seconds rather than the broker's visibility timeout.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.settings import Settings

log = logging.getLogger("graftq.worker")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: A child that exits sooner than this after starting counts as a quick (failed) start.
QUICK_EXIT_SECONDS = 60.0
#: Queued broker jobs without a recorded publish older than this are re-published.
UNPUBLISHED_GRACE_SECONDS = 300.0
#: Queued jobs published longer ago than this are checked against the broker's contents.
LOST_MESSAGE_GRACE_SECONDS = 60.0
#: kombu's Redis transport: priority queues are `<queue>\x06\x16<priority>`; `unacked` holds
#: delivered, unacknowledged messages (running, or held by a worker for a retry countdown).
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITY_STEPS = (3, 6, 9)
_REDIS_UNACKED = "unacked"


class LauncherError(Exception):
    """`graftq worker` cannot start as asked; the message says why."""


@dataclass(frozen=True)
class GpuSelection:
    """`all`, `none`, or explicit GPU indices."""

    mode: str  # "all" | "none" | "list"
    indices: tuple[int, ...] = ()


def parse_gpus(value: str) -> GpuSelection:
    """Parse `--gpus`: `all`, `none`, or comma-separated GPU indices. Raises ValueError."""
    text = value.strip().lower()
    if text in {"all", "none"}:
        return GpuSelection(text)
    try:
        indices = tuple(int(part) for part in text.split(",") if part.strip() != "")
    except ValueError:
        raise ValueError(f"{value!r} is not `all`, `none` or GPU indices such as 0,1") from None
    if not indices or any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise ValueError(f"{value!r}: give distinct GPU indices >= 0, such as 0,1")
    return GpuSelection("list", indices)


def detect_gpus() -> list[int]:
    """Indices of the NVIDIA GPUs `nvidia-smi -L` lists ([] without the tool or a GPU)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    return [index for index, line in enumerate(row for row in listing.stdout.splitlines() if row.startswith("GPU "))]


@dataclass
class WorkerProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    given_up: bool = False
    exit_codes: list[int] = field(default_factory=list)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a SIGKILLed launcher takes its workers along
    except OSError:
        pass


def plan_workers(
    settings: Settings, selection: GpuSelection, *, queues: str | None = None, loglevel: str = "INFO",
    gpus: list[int] | None = None,
) -> list[WorkerProcess]:
    """The worker processes to start for `selection` (GPUs from `nvidia-smi` unless given)."""
    if selection.mode == "none":
        devices: list[int | None] = [None]
    else:
        available = detect_gpus() if gpus is None else gpus
        if selection.mode == "all":
            if available:
                devices = list(available)
            else:
                log.warning("no NVIDIA GPU found (nvidia-smi -L): starting one CPU worker instead")
                devices = [None]
        else:
            missing = [i for i in selection.indices if i not in available]
            if missing:
                raise LauncherError(
                    f"GPU {', '.join(map(str, missing))} not found: nvidia-smi lists "
                    f"{', '.join(map(str, available)) or 'no GPU'}; use --gpus all, --gpus none or valid indices"
                )
            devices = list(selection.indices)

    base_env = dict(os.environ)
    base_env.update(settings.to_env())
    pythonpath = [str(PROJECT_ROOT), *filter(None, base_env.get("PYTHONPATH", "").split(os.pathsep))]
    base_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    planned = []
    for device in devices:
        if device is None:
            name, consumed = "graftq-cpu", queues or f"{settings.cpu_queue},{settings.queue}"
            visible = ""  # a CPU worker must not grab a GPU through device: auto
        else:
            name, consumed = f"graftq-gpu{device}", queues or f"{settings.gpu_queue},{settings.queue}"
            visible = str(device)
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.tasks:app", "worker",
            "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
            "-Q", consumed, "-n", f"{name}@%h", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle",
        ]
        planned.append(WorkerProcess(name, argv, {**base_env, "CUDA_VISIBLE_DEVICES": visible}))
    return planned


def broker_job_ids(settings: Settings) -> set[str] | None:
    """Ids of the jobs that have a message in the broker (waiting or unacknowledged).

    Redis only (None for another broker): reads the graftq queues and kombu's `unacked`
    hash. Messages carry the job id as their task id.
    """
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    from jobs.settings import broker_tls

    url, tls = broker_tls(settings.broker_url)
    client = redis.Redis.from_url(url, socket_timeout=30, **(tls or {}))
    try:
        raw_messages = []
        for queue in settings.queues:
            for key in (queue, *(f"{queue}{_REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITY_STEPS)):
                raw_messages += client.lrange(key, 0, -1)
        unacked = [json.loads(value)[0] for value in client.hvals(_REDIS_UNACKED)]
    finally:
        client.close()
    ids: set[str] = set()
    for message in [*(json.loads(raw) for raw in raw_messages), *unacked]:
        task_id = message.get("headers", {}).get("id") if isinstance(message, dict) else None
        if task_id:
            ids.add(task_id)
    return ids


def reap_once(settings: Settings, *, check_lost: bool = True) -> dict[str, int]:
    """Recover jobs; returns counts by action (requeued, settled, republished, lost).

    Re-queues (and re-publishes) or fails the jobs whose worker died, publishes queued jobs
    that never got a message, and with `check_lost` those whose message the broker lost.
    """
    from db.queries import (
        find_stale_jobs,
        get_job,
        mark_published,
        queued_published_before,
        requeue_stale_job,
        settle_stale_job,
        unpublished_queued,
    )
    from db.session import get_database
    from jobs.celery_app import configure
    from jobs.submit import publish_jobs

    database = get_database(settings.database_url)
    counts = {"requeued": 0, "settled": 0, "republished": 0, "lost": 0}
    to_publish: list[tuple[str, str]] = []
    with database.read() as session:
        stale = find_stale_jobs(session, settings.stale_after)
    for job_id in stale:
        with database.begin() as session:
            settled = settle_stale_job(session, job_id, settings.stale_after)
            if settled:
                counts["settled"] += 1
                log.warning("job %s: its worker died and it cannot run again: %s", job_id, settled)
                continue
            if requeue_stale_job(session, job_id, settings.stale_after):
                counts["requeued"] += 1
                job = get_job(session, job_id)
                assert job is not None and job.queue is not None
                to_publish.append((job_id, job.queue))
                log.warning("job %s: its worker died (no heartbeat for %.0f s); re-queued after attempt %d",
                            job_id, settings.stale_after, job.attempts)
    # Queued broker jobs without a recorded message: a submit or an earlier re-queue that died
    # before publishing. The grace period keeps a submit that is still publishing out of it.
    with database.read() as session:
        requeued = {job_id for job_id, _ in to_publish}
        to_publish += [(job.id, job.queue) for job in unpublished_queued(session, UNPUBLISHED_GRACE_SECONDS)
                       if job.id not in requeued and job.queue is not None]
        waiting = [(job.id, job.queue) for job in queued_published_before(session, LOST_MESSAGE_GRACE_SECONDS)
                   if job.queue is not None]
    # The database is the record (RELIABILITY.md 5): a queued job whose message the broker lost
    # (restarted without persistence, or lost its last second of AOF) is published again. A
    # duplicate, should a worker take the message in the instant of the check, is harmless: the
    # claim lets only one run.
    if waiting and check_lost:
        present = broker_job_ids(settings)
        if present is not None:
            lost = [(job_id, queue) for job_id, queue in waiting if job_id not in present]
            if lost:
                log.warning("%d queued job(s) have no message on the broker (lost in a broker restart?); "
                            "publishing them again", len(lost))
            counts["lost"] = len(lost)
            to_publish += lost
    if to_publish:
        app = configure(settings)
        sent = publish_jobs(app, [job_id for job_id, _ in to_publish], [queue for _, queue in to_publish])
        with database.begin() as session:
            mark_published(session, sent)
        counts["republished"] = len(sent)
        log.info("published %d queued job(s) that had no message on the broker", len(sent))
    return counts


#: Seconds between comparisons of the queued jobs with the broker's contents (reads every message).
LOST_CHECK_INTERVAL = 300.0


class _Reaper(threading.Thread):
    def __init__(self, settings: Settings, interval: float):
        super().__init__(name="graftq-reaper", daemon=True)
        self.settings = settings
        self.interval = interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        last_lost_check = time.monotonic()
        while not self.stop_event.wait(self.interval):
            check_lost = time.monotonic() - last_lost_check >= LOST_CHECK_INTERVAL
            try:
                reap_once(self.settings, check_lost=check_lost)
            except Exception as error:  # the broker or the database is away; try again later
                log.warning("reaper: %s", error)
                continue
            if check_lost:
                last_lost_check = time.monotonic()


def serve(
    settings: Settings, selection: GpuSelection, *, queues: str | None = None, loglevel: str = "INFO",
    reap_interval: float = 30.0, max_restarts: int = 5,
) -> int:
    """Run the worker processes until they exit; returns the exit status for the CLI."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/graftq-worker] %(message)s")
    workers = plan_workers(settings, selection, queues=queues, loglevel=loglevel)
    stopping = threading.Event()

    def start(worker: WorkerProcess) -> None:
        worker.process = subprocess.Popen(
            worker.argv, env=worker.env, cwd=os.getcwd(), start_new_session=True, preexec_fn=_die_with_parent
        )
        worker.started_at = time.monotonic()
        log.info("started %s (pid %d, CUDA_VISIBLE_DEVICES=%r)", worker.name, worker.process.pid,
                 worker.env["CUDA_VISIBLE_DEVICES"])

    def forward(signum: int, _frame: object) -> None:
        if stopping.is_set():
            # A second signal stops the running jobs now. Not Celery's cold shutdown (SIGQUIT): with
            # the solo pool it raises inside the running task, which would record the job as failed.
            # Killed, the job keeps its claim and unacknowledged message and is recovered (re-queued
            # by the reaper) like the job of any dead worker.
            log.info("%s again: killing the workers now", signal.Signals(signum).name)
            signum = signal.SIGKILL
        else:
            log.info("%s: stopping the workers (running jobs save a checkpoint and go back to the queue)",
                     signal.Signals(signum).name)
        stopping.set()
        for worker in workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    reaper = _Reaper(settings, reap_interval) if reap_interval > 0 else None
    try:
        for worker in workers:
            start(worker)
        if reaper is not None:
            reaper.start()
        while True:
            alive = 0
            for worker in workers:
                process = worker.process
                if process is None or worker.given_up:
                    continue
                code = process.poll()
                if code is None:
                    alive += 1
                    continue
                worker.exit_codes.append(code)
                worker.process = None
                if stopping.is_set():
                    continue
                quick = time.monotonic() - worker.started_at < QUICK_EXIT_SECONDS
                worker.quick_exits = worker.quick_exits + 1 if quick else 0
                if worker.quick_exits > max_restarts:
                    worker.given_up = True
                    log.error("%s exited %d times in a row soon after starting (last status %d); not "
                              "restarting it. Check its log above", worker.name, worker.quick_exits, code)
                    continue
                log.warning("%s exited with status %d; restarting it", worker.name, code)
                time.sleep(min(30.0, 2.0 ** worker.quick_exits) if quick else 0.0)
                start(worker)
                alive += 1
            if alive == 0:
                break
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if reaper is not None:
            reaper.stop_event.set()
    if stopping.is_set():
        return 0
    return 1
