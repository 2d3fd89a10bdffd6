"""`graftq worker`: start and supervise one Celery worker process per GPU (or one CPU worker),
or K of them per GPU with `--jobs-per-gpu K`.

Each child is `python -m celery -A worker.tasks:app worker --pool solo --concurrency 1
--prefetch-multiplier 1 -Q <queues> -n graftq-gpu<N>@%h`, pinned to GPU N by its UUID in
`CUDA_VISIBLE_DEVICES` (inside, the GPU is `cuda:0`): one job at a time per GPU, and the
parent never touches CUDA (GPUs are listed with `nvidia-smi -L`), so nothing CUDA-related
is inherited across a fork. A GPU child checks its GPU before it takes a job
(`child_started`).

The parent
- forwards SIGTERM/SIGINT to the children (warm shutdown: a running job saves a checkpoint
  at its next training step and is handed back to the queue, so another worker resumes it;
  a second signal kills them, and their jobs are recovered like a dead worker's) and exits
  when they have exited;
- restarts a child that exits on its own (a sticky CUDA error ends the process on
  purpose), giving up after `max_restarts` quick exits in a row, or at once when the
  child's GPU failed its self-check;
- runs the reaper: jobs whose heartbeat went stale (their worker was killed) are
  re-queued and re-published, or failed once out of attempts, within
  `stale_after + reap_interval` seconds rather than the broker's visibility timeout.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from jobs.settings import Settings
from worker.distributed import SLOTS_ENV, WORKER_SIZE_ENV, WORKER_SLOT_ENV, slot_env

log = logging.getLogger("graftq.worker")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: A child that exits sooner than this after starting counts as a quick (failed) start.
QUICK_EXIT_SECONDS = 60.0
#: Queued broker jobs without a recorded publish older than this are re-published.
UNPUBLISHED_GRACE_SECONDS = 300.0
#: Queued jobs published longer ago than this are checked against the broker's contents.
LOST_MESSAGE_GRACE_SECONDS = 60.0
#: kombu's Redis transport: `unacked` holds delivered, unacknowledged messages (running, or held by
#: a worker for a retry countdown); the priority lists are named in jobs.celery_app.
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


@dataclass(frozen=True)
class Gpu:
    """A device one worker process owns: a whole GPU, or one MIG instance of a GPU."""

    index: int  #: nvidia-smi's GPU index (PCI bus order), what `--gpus` takes
    name: str
    uuid: str  #: `GPU-...`, or `MIG-...` for a MIG instance: what CUDA_VISIBLE_DEVICES pins
    gpu_uuid: str  #: the physical GPU's UUID (the same as `uuid` for a whole GPU)
    mig: int | None = None  #: the MIG device number within the GPU

    @property
    def label(self) -> str:
        return f"gpu{self.index}" if self.mig is None else f"gpu{self.index}-mig{self.mig}"


_GPU_LINE = re.compile(r"GPU (\d+): (.*?) \(UUID: ([^)]+)\)")
_MIG_LINE = re.compile(r"\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: ([^)]+)\)")


def detect_gpus() -> list[Gpu]:
    """The devices `nvidia-smi -L` lists, a MIG-enabled GPU as its MIG instances ([] without the tool)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    gpus: list[Gpu] = []
    for line in listing.stdout.splitlines():
        if whole := _GPU_LINE.match(line):
            gpus.append(Gpu(int(whole[1]), whole[2], whole[3], whole[3]))
        elif (mig := _MIG_LINE.match(line)) and gpus:
            parent = gpus[-1]
            if parent.mig is None:  # CUDA cannot use a MIG-enabled GPU as a whole: only its instances
                gpus.pop()
            gpus.append(Gpu(parent.index, f"{parent.name} MIG {mig[1]}", mig[3], parent.gpu_uuid, int(mig[2])))
    return gpus


def inherited_gpus(gpus: list[Gpu], visible: str | None) -> list[Gpu]:
    """The devices of `gpus` that an inherited CUDA_VISIBLE_DEVICES leaves visible (all when unset).

    Entries are nvidia-smi indices (PCI bus order, whatever CUDA_DEVICE_ORDER says) or UUIDs
    (`GPU-...` or `MIG-...`, unique prefixes allowed, as CUDA takes them). An entry that
    matches nothing is refused: CUDA would silently drop it and every entry after it.
    """
    if visible is None or not gpus:  # without nvidia-smi's list there is nothing to check it against
        return gpus
    chosen: list[Gpu] = []
    for entry in filter(None, (part.strip() for part in visible.split(","))):
        if entry == "-1":  # CUDA's way of hiding the GPUs from here on
            break
        if entry.isdigit():
            matched = [gpu for gpu in gpus if gpu.index == int(entry)]
        else:  # a GPU's UUID selects it whole, or all of its MIG instances
            matched = [gpu for gpu in gpus if gpu.uuid.startswith(entry) or gpu.gpu_uuid.startswith(entry)]
        if not matched:
            raise LauncherError(
                f"CUDA_VISIBLE_DEVICES={visible!r}: {entry!r} is not a GPU nvidia-smi lists "
                f"({', '.join(f'{gpu.index} {gpu.uuid}' for gpu in gpus) or 'none'}); unset it, or give "
                "nvidia-smi indices or UUIDs, or choose GPUs with --gpus"
            )
        chosen += [gpu for gpu in matched if gpu not in chosen]
    return chosen


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


#: Set by `graftq worker` in the environment of the processes it starts (read by `child_started`).
LAUNCHER_PID_ENV = "GRAFTQ_LAUNCHER_PID"
WORKER_GPU_ENV = "GRAFTQ_WORKER_GPU"
#: A worker process's exit status when its GPU fails the start-up self-check (EX_CONFIG): a
#: restart cannot cure a CPU-only torch or a missing device, so the launcher does not restart it.
SELF_CHECK_FAILED = 78


def child_started() -> None:
    """Start-up of a worker process of `graftq worker`, before it takes a job (Celery's worker_init).

    It dies with the launcher (a SIGKILLed launcher takes its workers along), and a GPU worker
    checks its GPU: a worker that cannot run CUDA must not drain the GPU queue.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the launcher's main thread ends
        except (OSError, AttributeError):  # not Linux
            pass
        if os.getppid() != int(launcher):  # the launcher died before the death signal was set
            raise SystemExit(f"graftq worker: the launcher (pid {launcher}) is gone; this worker process exits")
    gpu = os.environ.get(WORKER_GPU_ENV)
    if gpu:
        from worker.device import check_gpu_worker

        problem = check_gpu_worker()
        if problem is not None:
            print(f"graftq worker: GPU {gpu} failed the start-up self-check: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(SELF_CHECK_FAILED)


def plan_workers(
    settings: Settings, selection: GpuSelection, *, queues: str | None = None, loglevel: str = "INFO",
    gpus: list[Gpu] | None = None, jobs_per_gpu: int = 1, cpu_slots: int = 1, slots_dir: str | None = None,
) -> list[WorkerProcess]:
    """The worker processes to start for `selection` (GPUs from `nvidia-smi` unless given).

    `--gpus` takes nvidia-smi's indices (PCI bus order); an inherited CUDA_VISIBLE_DEVICES limits
    them. Each worker is pinned by UUID (a MIG instance gets a worker of its own) with
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so the GPU it gets is the one nvidia-smi names, on any host.
    `jobs_per_gpu` K starts K processes per device, all pinned to it (K CPU processes without a
    GPU), so that K small jobs share one GPU, each in a process, memory and peak of its own.
    """
    if jobs_per_gpu < 1:
        raise LauncherError(f"--jobs-per-gpu {jobs_per_gpu}: give 1 or more jobs per GPU")
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices: list[Gpu | None] = [None]
    if selection.mode != "none":
        available = inherited_gpus(detect_gpus() if gpus is None else gpus, inherited)
        limited = "" if inherited is None else f" (CUDA_VISIBLE_DEVICES={inherited!r} limits them)"
        if selection.mode == "all":
            if available:
                devices = list(available)
            else:
                log.warning("no NVIDIA GPU found (nvidia-smi -L)%s: starting one CPU worker instead", limited)
        else:
            missing = [i for i in selection.indices if all(gpu.index != i for gpu in available)]
            if missing:
                listed = sorted({gpu.index for gpu in available})
                raise LauncherError(
                    f"GPU {', '.join(map(str, missing))} not found: nvidia-smi lists "
                    f"{', '.join(map(str, listed)) or 'no GPU'}{limited}; use --gpus all, --gpus none or valid indices"
                )
            devices = [gpu for gpu in available if gpu.index in selection.indices]
    if devices == [None] and cpu_slots > 1:
        devices = [None] * cpu_slots
    # Devices shared through lock files (worker/distributed.py) so that multi-device jobs can
    # gather several; NCCL cannot join MIG instances, so a host with MIG runs one-device jobs only.
    shared = len(devices) > 1 and all(device is None or device.mig is None for device in devices)
    slots = ["cpu" if device is None else device.uuid for device in devices]

    base_env = {key: value for key, value in os.environ.items() if key != WORKER_GPU_ENV}
    base_env.update(settings.to_env())
    base_env[LAUNCHER_PID_ENV] = str(os.getpid())
    pythonpath = [str(PROJECT_ROOT), *filter(None, base_env.get("PYTHONPATH", "").split(os.pathsep))]
    base_env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
    planned = []
    for index, device in enumerate(devices):
        if device is None:
            name = "graftq-cpu" if len(devices) == 1 else f"graftq-cpu{index}"
            consumed = queues or f"{settings.cpu_queue},{settings.queue}"
            pinned = {"CUDA_VISIBLE_DEVICES": ""}  # a CPU worker must not grab a GPU through device: auto
        else:
            name, consumed = f"graftq-{device.label}", queues or f"{settings.gpu_queue},{settings.queue}"
            pinned = {"CUDA_VISIBLE_DEVICES": device.uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                      WORKER_GPU_ENV: f"{device.index} ({device.name}, {device.uuid})"}
        if shared:
            pinned.update(slot_env(slots_dir or host_slots_dir(), slots, slot=index))
        for slot in range(1, jobs_per_gpu + 1):
            process_name = name if jobs_per_gpu == 1 else f"{name}-{slot}"
            argv = [
                sys.executable, "-m", "celery", "-A", "worker.tasks:app", "worker",
                "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
                "-Q", consumed, "-n", f"{process_name}@%h", "--loglevel", loglevel,
                "--without-gossip", "--without-mingle",
            ]
            env = {**base_env, **pinned, **_shared_cores(base_env, jobs_per_gpu)}
            planned.append(WorkerProcess(process_name, argv, env))
    return planned


def _shared_cores(env: dict[str, str], processes: int) -> dict[str, str]:
    """Thread limits for `processes` worker processes sharing one device: torch's CPU threads
    (data collation, CPU jobs) split the cores between them, unless OMP_NUM_THREADS is set."""
    if processes == 1 or env.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}


def host_slots_dir() -> str:
    """The lock directory of this launcher's devices (removed when it stops)."""
    return os.path.join(tempfile.gettempdir(), f"graftq-devices-{os.getpid()}")


def plan_sized_workers(workers: list[WorkerProcess]) -> list[WorkerProcess]:
    """One worker process for each job size from 2 to the host's device count, beside the
    one-device `workers` (from `plan_workers`): size N consumes `<queue>.gpus-N` for each of their
    queues, holds no device, and gathers N free devices for each job it takes."""
    from jobs.submit import sized_queue

    template = next((worker for worker in workers if SLOTS_ENV in worker.env), None)
    if template is None:  # one device, or MIG instances
        return []
    devices = template.env[SLOTS_ENV].split(",")
    kind = "cpus" if devices[0] == "cpu" else "gpus"
    queues = template.argv[template.argv.index("-Q") + 1].split(",")
    env = {key: value for key, value in template.env.items() if key not in (WORKER_GPU_ENV, WORKER_SLOT_ENV)}
    sized = []
    for size in range(2, len(devices) + 1):
        name = f"graftq-{size}{kind}"
        argv = list(template.argv)
        argv[argv.index("-Q") + 1] = ",".join(sized_queue(queue, size) for queue in queues)
        argv[argv.index("-n") + 1] = f"{name}@%h"
        # its ranks are pinned to the devices it gathers; it never touches one itself
        sized.append(WorkerProcess(name, argv, {**env, "CUDA_VISIBLE_DEVICES": "", WORKER_SIZE_ENV: str(size)}))
    return sized


def broker_job_ids(settings: Settings, queues: Sequence[str] = ()) -> set[str] | None:
    """Ids of the jobs that have a message in the broker (waiting or unacknowledged).

    Redis only (None for another broker): reads the graftq queues and kombu's `unacked`
    hash. Messages carry the job id as their task id.
    """
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    from jobs.celery_app import REDIS_PRIORITY_SEP, REDIS_PRIORITY_STEPS
    from jobs.settings import broker_tls

    url, tls = broker_tls(settings.broker_url)
    client = redis.Redis.from_url(url, socket_timeout=30, **(tls or {}))
    try:
        raw_messages = []
        for queue in dict.fromkeys([*settings.queues, *queues]):  # and the queues of multi-GPU jobs
            for key in (queue, *(f"{queue}{REDIS_PRIORITY_SEP}{p}" for p in REDIS_PRIORITY_STEPS if p)):
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



class _Message(NamedTuple):
    """A queued job the reaper (re)publishes: its id, queue and priority."""

    job_id: str
    queue: str
    priority: int

def reap_once(settings: Settings, *, check_lost: bool = True) -> dict[str, int]:
    """Recover jobs; returns counts by action (requeued, settled, republished, lost).

    Re-queues (and re-publishes) or fails the jobs whose worker died, publishes queued jobs
    that never got a message (among them jobs released by the jobs they need, whose worker died
    or lost the broker right after the commit), and with `check_lost` those whose message the
    broker lost.
    """
    from db.claims import find_stale_jobs, requeue_stale_job, settle_stale_job
    from db.dependencies import settle_waiting
    from db.queries import get_job, queued_published_before, unpublished_queued
    from db.session import get_database
    from db.submission import mark_published
    from jobs.celery_app import configure
    from jobs.submit import publish_jobs

    database = get_database(settings.database_url)
    counts = {"requeued": 0, "settled": 0, "republished": 0, "lost": 0}
    #: (id, queue, priority) of each job to publish
    to_publish: list[_Message] = []
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
                to_publish.append(_Message(job_id, job.queue, job.priority))
                log.warning("job %s: its worker died (no heartbeat for %.0f s); re-queued after attempt %d",
                            job_id, settings.stale_after, job.attempts)
    # Waiting jobs whose needs were all decided without their release or skip (rows written
    # behind graftq's back): outcomes do this themselves, so this finds nothing as a rule.
    with database.begin() as session:
        released, skipped = settle_waiting(session)
        for job_id in released:
            job = get_job(session, job_id)
            if job is not None and job.queue is not None:
                to_publish.append(_Message(job_id, job.queue, job.priority))
    if released or skipped:
        log.warning("released %d and skipped %d waiting job(s) whose needs had been decided",
                    len(released), len(skipped))
    # Queued broker jobs without a recorded message: a submit or an earlier re-queue that died
    # before publishing. The grace period keeps a submit that is still publishing out of it; a
    # job released by the jobs it needs is published by their worker right after its commit, so
    # its grace is the time after which that worker would count as dead.
    with database.read() as session:
        requeued = {message.job_id for message in to_publish}
        to_publish += [_Message(job.id, job.queue, job.priority)
                       for job in unpublished_queued(session, UNPUBLISHED_GRACE_SECONDS,
                                                     released_older_than=settings.stale_after)
                       if job.id not in requeued and job.queue is not None]
        waiting = [_Message(job.id, job.queue, job.priority)
                   for job in queued_published_before(session, LOST_MESSAGE_GRACE_SECONDS) if job.queue is not None]
    # The database is the record: a queued job whose message the broker lost
    # (restarted without persistence, or lost its last second of AOF) is published again. A
    # duplicate, should a worker take the message in the instant of the check, is harmless: the
    # claim lets only one run.
    if waiting and check_lost:
        present = broker_job_ids(settings, [message.queue for message in waiting])
        if present is not None:
            lost = [message for message in waiting if message.job_id not in present]
            if lost:
                log.warning("%d queued job(s) have no message on the broker (lost in a broker restart?); "
                            "publishing them again", len(lost))
            counts["lost"] = len(lost)
            to_publish += lost
    if to_publish:
        app = configure(settings)
        sent = publish_jobs(app, [m.job_id for m in to_publish], [m.queue for m in to_publish],
                            [m.priority for m in to_publish])
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
    reap_interval: float = 30.0, max_restarts: int = 5, jobs_per_gpu: int = 1, cpu_slots: int = 1,
) -> int:
    """Run the worker processes until they exit; returns the exit status for the CLI."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/graftq-worker] %(message)s")
    workers = plan_workers(settings, selection, queues=queues, loglevel=loglevel, jobs_per_gpu=jobs_per_gpu,
                           cpu_slots=cpu_slots)
    workers += plan_sized_workers(workers)
    stopping = threading.Event()

    def start(worker: WorkerProcess) -> None:
        worker.process = subprocess.Popen(
            worker.argv, env=worker.env, cwd=os.getcwd(), start_new_session=True)
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
                if code == SELF_CHECK_FAILED:
                    worker.given_up = True
                    log.error("%s failed its GPU self-check (its message is above); not restarting it. Fix the "
                              "torch install or the driver, or leave that GPU out with --gpus, then start "
                              "graftq worker again", worker.name)
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
        shutil.rmtree(host_slots_dir(), ignore_errors=True)
    if stopping.is_set():
        return 0
    return 1
