"""Pool under load: 8 `graftq worker` processes drain 2,000 `create` jobs from PostgreSQL and Redis,
while one worker is SIGKILLed and another restarted.

    python benchmarks/bench_pool_load.py                        # 8 workers, 2,000 jobs
    python benchmarks/bench_pool_load.py --workers 3 --jobs 60  # the fault suite's size

The jobs are LoRA `create` jobs on random:t5-tiny (build the model, count its parameters, save
the adapter: no training), so that the figure is the pool's own cost per job: the claim, the
heartbeat, the outcome's transaction, the broker's delivery and acknowledgement.

The pool: a redis-server of its own, a new PostgreSQL database of its own (on the server of
GRAFTQ_TEST_POSTGRES_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/test; dropped
afterwards), and `graftq worker --gpus none` processes as a user starts them (heartbeat every
1 s, stale after 4 s, reaper every 2 s). The batch is one `graftq submit`.

When a third of the jobs have finished, a worker running a job is SIGKILLed whole (its Celery
process and its launcher: the machine went away; the others carry on without it); when two
thirds have, another worker is restarted (SIGTERM, wait for it to exit, start it again).

Figures: jobs per second (submit start to the last `finished_at`), claim conflicts (deliveries
that found their job claimed or finished and were dropped: the visibility timeout's and the
reaper's re-deliveries), jobs the reaper re-queued, and the counts that must be zero: lost (a
job not `succeeded` at the end), run twice (a job whose success was recorded more than once,
or whose outcome was discarded because another worker held it), stuck in `running`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import (
    Check,
    Result,
    Worker,
    graftq_argv,
    graftq_env,
    main,
    redis_server,
    submit,
    time_command,
    workspace,
    write_batch,
)

NAME = "pool_load"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PRESET = "random:t5-tiny"
FINISHED = ("succeeded", "failed", "cancelled")
#: How fast a dead worker's job is noticed and re-queued: short, so that the run sees it.
RECOVERY = {"GRAFTQ_HEARTBEAT_INTERVAL": "1", "GRAFTQ_STALE_AFTER": "4", "GRAFTQ_VISIBILITY_TIMEOUT": "30",
            "OMP_NUM_THREADS": "1"}
REAP_INTERVAL = "2"
#: No job finished for this long: what is still unfinished is counted as it stands.
STALL_SECONDS = 90.0
CLAIMED = re.compile(r"job ([0-9a-f]{16}) \(batch [0-9a-f]{16}\) claimed by")
SUCCEEDED = re.compile(r"job ([0-9a-f]{16}) succeeded")
NOT_RUN = re.compile(r"job ([0-9a-f]{16}) not run: ")
RESTARTED = re.compile(r"exited with status -?\d+; restarting it")
DISCARDED = re.compile(r"job ([0-9a-f]{16}): claim lost before the outcome was recorded")
#: The reaper's line, with the time of the worker's log (local time, milliseconds after a comma).
REQUEUED = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): .*job ([0-9a-f]{16}): its worker died .*; re-queued")

#: Sizes: (workers, jobs).
FULL = (8, 2000)
QUICK = (3, 60)
SIZE: tuple[int, int] | None = None  # set from the command line


class PoolWorker(Worker):
    """`graftq worker --gpus none` with its reaper on and the job log at INFO (claims and outcomes)."""

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(graftq_argv("worker", "--gpus", "none", "--reap-interval", REAP_INTERVAL,
                                                    "--loglevel", "INFO"),
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def kill(self, celery_pid: int) -> None:
        """The whole worker dies at once (the machine went away): its Celery process (which runs in a
        session of its own), then the launcher, stopped first so that it cannot restart or signal it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        os.kill(celery_pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for this run (its URL); dropped afterwards."""
    from sqlalchemy import create_engine, text

    base = os.environ.get("GRAFTQ_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    admin = create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"graftq_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        from db.session import clear_cache

        clear_cache()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Pool:
    def __init__(self, env: dict[str, str], directory: Path):
        self.env = env
        self.directory = directory
        self.workers: list[PoolWorker] = []

    def start_worker(self) -> PoolWorker:
        worker = PoolWorker(self.env, self.directory / f"worker{len(self.workers)}.log")
        worker.start()
        self.workers.append(worker)
        return worker

    def live(self) -> list[PoolWorker]:
        return [w for w in self.workers if w.process is not None and w.process.poll() is None]

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(" ready." in w.text() for w in self.live()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the workers were not ready within {timeout:.0f} s:\n{self.logs()[-3000:]}")

    def owner_of(self, celery_pid: int) -> PoolWorker | None:
        """The live worker whose launcher started this Celery process."""
        try:
            parent = int(Path(f"/proc/{celery_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None
        return next((w for w in self.live() if w.process is not None and w.process.pid == parent), None)

    def logs(self) -> str:
        return "\n".join(w.text() for w in self.workers)

    def stop(self) -> None:
        for worker in self.live():
            worker.stop()


def counts(database_url: str, batch_id: str) -> Counter[str]:
    from sqlalchemy import func, select

    from db.session import get_database
    from db.tables import jobs

    with get_database(database_url).read() as session:
        rows = session.execute(select(jobs.c.status, func.count()).where(jobs.c.batch_id == batch_id)
                               .group_by(jobs.c.status)).all()
    return Counter({status: number for status, number in rows})


def running_job(database_url: str, batch_id: str) -> tuple[str, int] | None:
    """A job of the batch running now and the Celery pid of its worker (None if none is)."""
    from sqlalchemy import select

    from db.session import get_database
    from db.tables import jobs

    with get_database(database_url).read() as session:
        # the latest started: the most of its run is still ahead when the signal lands
        row = session.execute(select(jobs.c.id, jobs.c.worker).where(jobs.c.batch_id == batch_id,
                                                                     jobs.c.status == "running")
                              .order_by(jobs.c.started_at.desc()).limit(1)).first()
    return (row.id, int(row.worker.rsplit(":", 1)[1])) if row else None


def wait_until(what: str, predicate, timeout: float, pool: Pool) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{pool.logs()[-3000:]}")


def kill_a_busy_worker(pool: Pool, database_url: str, batch_id: str) -> None:
    """SIGKILL a worker that was running a job a moment ago (it may have moved on to its next one)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = running_job(database_url, batch_id)
        victim = pool.owner_of(running[1]) if running is not None else None
        if victim is not None:
            victim.kill(running[1])
            return
        time.sleep(0.02)
    raise RuntimeError(f"no job of the batch was seen running within 10 s:\n{pool.logs()[-3000:]}")


def log_time(stamp: str, milliseconds: str) -> float:
    """Epoch seconds of a worker log line's time (local time, as the workers write it)."""
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(milliseconds) / 1000


def drain(workers: int, jobs: int, tmp: Path, database_url: str, broker_url: str) -> dict:
    """Run the scenario; returns its figures."""
    from db.queries import jobs_of_batch
    from db.session import get_database

    env = graftq_env(GRAFTQ_DATABASE_URL=database_url, GRAFTQ_BROKER_URL=broker_url,
                     GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"), **RECOVERY)
    entries = [{"task": f"build{index % 50:02d}", "kind": "create", "extension": "lora", "device": "cpu",
                "lora": {"r": 4, "alpha": 8}} for index in range(jobs)]
    batch_file = write_batch(tmp / "load.yaml", "load", entries, PRESET)
    time_command(graftq_argv("db", "upgrade"), env=env)
    pool = Pool(env, tmp)
    for _ in range(workers):
        pool.start_worker()
    try:
        pool.wait_ready()
        started = time.time()
        submit_seconds, batch_id = submit(env, batch_file)

        def finished() -> int:
            return sum(number for status, number in counts(database_url, batch_id).items() if status in FINISHED)

        wait_until("a third of the jobs to finish", lambda: finished() >= jobs // 3, 1800, pool)
        kill_a_busy_worker(pool, database_url, batch_id)
        killed_at = time.time()
        wait_until("two thirds of the jobs to finish", lambda: finished() >= 2 * jobs // 3, 1800, pool)
        restarted = pool.live()[0]
        restarted.stop()
        restarted.start()
        # Every job finishes, or what is left is counted once nothing has finished for longer than
        # the last chances of a dead worker's job: the reaper (stale after 4 s), the visibility timeout.
        last, last_change = finished(), time.monotonic()
        while last < jobs and time.monotonic() - last_change < STALL_SECONDS:
            time.sleep(0.2)
            now = finished()
            if now != last:
                last, last_change = now, time.monotonic()
        with get_database(database_url).read() as session:
            rows = jobs_of_batch(session, batch_id)
    finally:
        pool.stop()
    logs = pool.logs()
    succeeded_logged = Counter(SUCCEEDED.findall(logs))
    claimed = Counter(CLAIMED.findall(logs))
    discarded = Counter(DISCARDED.findall(logs))
    requeued = REQUEUED.findall(logs)
    done = sorted(row.finished_at.timestamp() for row in rows if row.finished_at is not None)
    warm = done[len(done) // 20] if done else started
    return {
        "workers": workers, "jobs": jobs, "submit_seconds": submit_seconds,
        "seconds": (done[-1] - started) if done else float("nan"),
        "jobs_per_second": len(done) / (done[-1] - started) if done else 0.0,
        "jobs_per_second_after_first_5pct": (len(done) - len(done) // 20) / (done[-1] - warm)
        if done and done[-1] > warm else 0.0,
        "job_seconds_median (claim to outcome)": statistics.median(
            (row.finished_at - row.started_at).total_seconds() for row in rows if row.finished_at and row.started_at),
        "claim_conflicts": sum(Counter(NOT_RUN.findall(logs)).values()),
        "requeued_by_reaper": len({job_id for _, _, job_id in requeued}),
        "claimed_more_than_once": sum(1 for n in claimed.values() if n > 1),
        # a live worker taken for dead (no heartbeat for 4 s while the machine is overloaded) shows here
        "requeued_before_kill": sum(log_time(stamp, ms) < killed_at - 1 for stamp, ms, _ in requeued),
        "celery_processes_restarted_by_their_launcher": len(RESTARTED.findall(logs)),
        "requeued_after_kill_s": max((log_time(stamp, ms) - killed_at for stamp, ms, _ in requeued), default=None),
        "requeued_jobs (status, attempts)": [(row.status, row.attempts) for row in rows
                                             if row.id in {job_id for _, _, job_id in requeued}],
        # re-published behind the jobs still queued, so it runs near the end of the batch
        "requeued_finished_after_kill_s": max((row.finished_at.timestamp() - killed_at for row in rows
                                               if row.finished_at and row.id in {job_id for _, _, job_id in requeued}),
                                              default=None),
        "lost": sum(row.status not in ("succeeded", "running") for row in rows) + (jobs - len(rows)),
        "run_twice": sum(1 for job_id, n in succeeded_logged.items() if n > 1) + len(discarded),
        "stuck_running": sum(row.status == "running" for row in rows),
        "statuses": dict(Counter(row.status for row in rows)),
    }


def run(quick: bool) -> Result:
    workers, jobs = SIZE or (QUICK if quick else FULL)
    result = Result(NAME, f"{workers} `graftq worker` processes drain {jobs} create jobs ({PRESET}) from "
                          "PostgreSQL + Redis; one worker SIGKILLed, one restarted")
    with workspace("pool") as tmp, redis_server(tmp) as redis, postgres_database() as database_url:
        figures = drain(workers, jobs, tmp, database_url, redis.url)
    result.figures.update(figures)
    for key in ("lost", "run_twice", "stuck_running"):
        result.checks.append(Check(f"jobs {key.replace('_', ' ')}", value=figures[key], unit="jobs",
                                   target="0", passed=figures[key] == 0))
    result.notes.append("jobs_per_second runs from the start of `graftq submit` to the last finished_at, "
                        "through both faults; claim conflicts are deliveries dropped because another worker "
                        "held or had finished the job")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--jobs", type=int)
    sizes, rest = parser.parse_known_args()
    if {"-h", "--help"} & set(rest):
        print(f"sizes: --workers N --jobs N (default {FULL[0]} and {FULL[1]}; --quick: {QUICK[0]} and {QUICK[1]})")
    if sizes.workers or sizes.jobs:
        SIZE = (sizes.workers or FULL[0], sizes.jobs or FULL[1])
    raise SystemExit(main(NAME, run, rest))
