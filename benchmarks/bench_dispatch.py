"""Dispatch overhead: 200 `create` jobs through Redis and one worker vs the same jobs in a loop.

Queue side: a private redis-server, a SQLite file, and `graftq worker --gpus none` started
the way a user starts it. One warm-up batch (one job of each extension kind) makes the worker
import everything and cache the base model. Then `graftq submit` sends 200 create jobs on
random:t5-tiny (lora, layer and hybrid in turn) and the clock runs from the start of the
submit command until the last job's `finished_at` in the database.

Reference: the same 200 job specs run by calling `worker.pipeline.run_job` in a loop, in a
process of its own (warmed up like the worker), never in this one: this process accumulates
objects of its own (database polling) that would slow every garbage collection of a loop run
here, and flatter the queue.

The check runs the two in lockstep. After every 20th job, the worker (instrumented by
`_shim/sitecustomize.py`, put on its PYTHONPATH by this benchmark only) hands its turn to the
reference process through Redis and waits while that process runs the same 20 specs through
`run_job`, each timed there. The time the worker waited is taken out of the queue's clock; the
reference's time is the sum of its timed jobs. The machine drifts by 10-20% within seconds, so
whole runs ten seconds apart compare its moods as much as the code (per-round ratios spread
0.91 to 1.24); turns of about a second see the same machine. Turns of one job each were tried
and rejected: switching processes after every job left both sides' caches cold, which made
every job ~45% slower and graftq's fixed costs look smaller. For comparison, the figures also
give whole runs one after the other (reference, queue, reference), as this benchmark measured
before.

Per-job overhead: the worker's pipeline calls are timed from inside the worker (the shim), so
everything else the worker does for a job is graftq's dispatch:
  fetch + claim = previous job recorded (its `finished_at`) -> this job claimed (`started_at`),
  start         = claimed -> pipeline starts (spec read, heartbeat thread, context),
  record        = pipeline returned -> `finished_at` (outcome, stats, loss curve written),
                  less the lockstep wait,
and the per-job overhead is their sum (for the first job, submit start -> claim replaces
fetch + claim).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    BENCH_DIR,
    Check,
    Result,
    Worker,
    graftq_env,
    main,
    percentile,
    redis_server,
    sqlite_url,
    submit,
    wait_for_batch,
    workspace,
    write_batch,
)

NAME = "dispatch"
TARGET_RATIO = 1.2
KINDS = ["lora", "layer", "hybrid"]
PRESET = "random:t5-tiny"


def job_entries(count: int, prefix: str) -> list[dict]:
    return [{"task": f"{prefix}{index:04d}", "kind": "create", "extension": KINDS[index % len(KINDS)],
             "device": "cpu"} for index in range(count)]


def reference_loop(entries: list[dict], root: Path) -> list[float]:
    """Run the jobs by calling the pipeline function directly; per-job seconds."""
    from jobs.spec import JobSpec
    from worker.pipeline import JobContext, run_job

    seconds = []
    for index, entry in enumerate(entries):
        spec = JobSpec(base_model=PRESET, **entry)
        started = time.perf_counter()
        run_job(JobContext(job_id=f"ref{index:04d}", batch_id=f"ref{int(started * 1000)}", spec=spec,
                           artifacts_root=root))
        seconds.append(time.perf_counter() - started)
    return seconds


REFERENCE_CHILD = """
import json, sys
from pathlib import Path
from bench_dispatch import job_entries, reference_loop
count, root = int(sys.argv[1]), Path(sys.argv[2])
reference_loop(job_entries(3, "w"), root)  # warm-up: imports, the cached base model
print(json.dumps(reference_loop(job_entries(count, "t"), root)))
"""


def reference_in_fresh_process(count: int, root: Path) -> list[float]:
    """`reference_loop` over the benchmark's `count` jobs in a new Python process; per-job seconds."""
    completed = subprocess.run([sys.executable, "-c", REFERENCE_CHILD, str(count), str(root)], cwd=BENCH_DIR,
                               env=graftq_env(), capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the reference loop failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


LOCKSTEP_EVERY = 20  # jobs per lockstep turn: ~1 s of work, so a turn changes caches rarely

LOCKSTEP_CHILD = """
import sys, time
from pathlib import Path
import redis
from bench_dispatch import LOCKSTEP_EVERY, job_entries, reference_loop
url, count, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
client = redis.Redis.from_url(url, socket_timeout=None)
reference_loop(job_entries(3, "w"), root)  # warm-up: imports, the cached base model
entries = job_entries(count, "t")
client.lpush("lockstep:ready", "1")
while True:
    _, task = client.brpop("lockstep:go")
    if task == b"stop":
        break
    if client.get("lockstep:mode") == b"run":
        last = int(task[1:])
        for seconds in reference_loop(entries[last + 1 - LOCKSTEP_EVERY:last + 1], root):
            client.rpush("lockstep:seconds", seconds)
    client.lpush("lockstep:done", "1")
"""


class LockstepReference:
    """The reference process of the lockstep rounds: on each turn the worker hands over, it runs
    the same stretch of the benchmark's jobs (the `LOCKSTEP_EVERY` up to the task it names)."""

    def __init__(self, url: str, count: int, root: Path, log_path: Path):
        import redis

        self.control = redis.Redis.from_url(url, socket_timeout=None)  # waits up to 300 s below
        self.control.set("lockstep:mode", "run")
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-c", LOCKSTEP_CHILD, url, str(count), str(root)], cwd=BENCH_DIR,
                                        env=graftq_env(), stdout=self.log, stderr=subprocess.STDOUT)
        if self.control.brpop("lockstep:ready", timeout=300) is None:
            raise RuntimeError("the lockstep reference process did not start")

    def running(self, run: bool) -> None:
        """Run the worker's specs (True), or answer each turn at once (False)."""
        self.control.set("lockstep:mode", "run" if run else "skip")

    def take_seconds(self) -> list[float]:
        """Per-job seconds of the reference jobs run since the last call."""
        seconds = [float(value) for value in self.control.lrange("lockstep:seconds", 0, -1)]
        self.control.delete("lockstep:seconds")
        return seconds

    def stop(self) -> None:
        self.control.lpush("lockstep:go", "stop")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def job_rows(database_url: str, batch_id: str) -> list[dict]:
    from sqlalchemy import select

    from db import tables
    from db.session import get_database

    query = select(tables.jobs).where(tables.jobs.c.batch_id == batch_id).order_by(tables.jobs.c.started_at)
    with get_database(database_url).read() as session:
        jobs = session.execute(query).all()
        return [{"id": job.id, "task": job.task, "status": job.status, "published_at": job.published_at,
                 "started_at": job.started_at, "finished_at": job.finished_at} for job in jobs]


def queue_round(env: dict[str, str], database_url: str, batch_file: Path, count: int, worker: Worker,
                timings: Path) -> dict:
    """`graftq submit` of the batch, then wait for the worker: the round's clock, rows and timings."""
    timings.unlink(missing_ok=True)
    t0 = time.time()
    submit_seconds, batch_id = submit(env, batch_file)
    wait_for_batch(database_url, batch_id, count, timeout=900, worker=worker, poll=2.0)
    rows = job_rows(database_url, batch_id)
    failed = [row["id"] for row in rows if row["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}: {worker.tail()}")
    pipeline = {}
    for line in timings.read_text().splitlines():
        record = json.loads(line)
        pipeline[record["job_id"]] = record
    total = max(row["finished_at"].timestamp() for row in rows) - t0
    waited = sum(pipeline[row["id"]]["waited"] for row in rows)
    return {"t0": t0, "submit_seconds": submit_seconds, "rows": rows, "pipeline": pipeline,
            "total": total - waited, "waited": waited}


def overhead_figures(queues: list[dict], references: list[list[float]]) -> dict:
    """Per-job overhead split (fetch + claim, start, record) and per-kind pipeline medians."""
    fetch_claim, start, record, overhead, pipeline_seconds, first_waits = [], [], [], [], [], []
    kinds_on_worker: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for queue in queues:
        previous_finished = queue["t0"]
        for index, row in enumerate(queue["rows"]):  # in claim order
            timing = queue["pipeline"][row["id"]]
            claimed, finished = row["started_at"].timestamp(), row["finished_at"].timestamp()
            if index == 0:
                first_waits.append(claimed - previous_finished)
            else:
                fetch_claim.append(claimed - previous_finished)
            start.append(timing["start"] - claimed)
            record.append(finished - timing["end"] - timing["waited"])
            pipeline_seconds.append(timing["end"] - timing["start"])
            kinds_on_worker[KINDS[int(row["task"][1:]) % len(KINDS)]].append(pipeline_seconds[-1])
            if index:
                overhead.append(fetch_claim[-1] + start[-1] + record[-1])
            previous_finished = finished
    ms = 1000.0
    return {
        "pipeline_s_per_job_on_worker_median": statistics.median(pipeline_seconds),
        "pipeline_s_per_job_in_reference_median": statistics.median(s for run in references for s in run),
        "pipeline_ms_median_by_kind, worker | reference": {
            kind: [round(statistics.median(kinds_on_worker[kind]) * ms, 1),
                   round(statistics.median(s for run in references for s in run[index::len(KINDS)]) * ms, 1)]
            for index, kind in enumerate(KINDS)},
        "overhead_ms_per_job_p50": percentile(overhead, 50) * ms,
        "overhead_ms_per_job_p95": percentile(overhead, 95) * ms,
        "overhead_ms_per_job_max": max(overhead) * ms,
        "fetch_claim_ms_p50/p95": [percentile(fetch_claim, 50) * ms, percentile(fetch_claim, 95) * ms],
        "start_ms_p50/p95": [percentile(start, 50) * ms, percentile(start, 95) * ms],
        "record_ms_p50/p95": [percentile(record, 50) * ms, percentile(record, 95) * ms],
        "first_job_wait_s (submit start -> claim)": first_waits,
    }


def run(quick: bool) -> Result:
    count = 40 if quick else 200
    rounds = 1 if quick else 3
    result = Result(NAME, f"{count} create jobs on {PRESET} through Redis + one `graftq worker` vs the "
                          "pipeline function in a loop, in lockstep")
    with workspace("dispatch") as tmp, redis_server(tmp) as redis:
        database_url = sqlite_url(tmp)
        timings = tmp / "pipeline-timings.jsonl"
        lockstep_url = redis.url.rsplit("/", 1)[0] + "/1"  # the broker uses database 0
        env = graftq_env(GRAFTQ_DATABASE_URL=database_url, GRAFTQ_BROKER_URL=redis.url,
                         GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"), GRAFTQ_BENCH_TIMINGS=str(timings),
                         GRAFTQ_BENCH_LOCKSTEP=lockstep_url, GRAFTQ_BENCH_LOCKSTEP_EVERY=str(LOCKSTEP_EVERY))
        env["PYTHONPATH"] = f"{BENCH_DIR / '_shim'}:{env['PYTHONPATH']}"
        batch_file = write_batch(tmp / "batch.yaml", "dispatch", job_entries(count, "t"), PRESET)

        reference = LockstepReference(lockstep_url, count, tmp / "lockstep-artifacts", tmp / "lockstep.log")
        worker = Worker(env, tmp / "worker.log")
        worker.start()
        lockstep: list[dict] = []
        sequential_queue: list[dict] = []
        sequential_references: list[list[float]] = []
        try:
            # Warm-up: the worker runs the three warm-up jobs (the lockstep reference ran its own).
            warm = write_batch(tmp / "warmup.yaml", "warmup", job_entries(3, "w"), PRESET)
            _, warm_id = submit(env, warm)
            wait_for_batch(database_url, warm_id, 3, timeout=300, worker=worker)
            reference.take_seconds()
            for _ in range(rounds):
                queue = queue_round(env, database_url, batch_file, count, worker, timings)
                queue["reference"] = reference.take_seconds()
                if len(queue["reference"]) != count:
                    raise RuntimeError(f"the lockstep reference ran {len(queue['reference'])} of {count} jobs")
                lockstep.append(queue)
            # For comparison: whole runs one after the other (reference, queue, reference), the
            # lockstep reference answering each turn at once (its waits still leave the clock).
            if not quick:
                reference.running(False)
                sequential_references.append(reference_in_fresh_process(count, tmp / "ref-artifacts"))
                sequential_queue.append(queue_round(env, database_url, batch_file, count, worker, timings))
                sequential_references.append(reference_in_fresh_process(count, tmp / "ref-artifacts"))
        finally:
            worker.stop()
            reference.stop()

    ratios = [queue["total"] / sum(queue["reference"]) for queue in lockstep]
    ratio = statistics.median(ratios)
    result.figures.update({
        "jobs": count, "rounds": rounds,
        "submit_command_s": [queue["submit_seconds"] for queue in lockstep],
        "lockstep_queue_total_s (submit start -> last finished_at, less the lockstep waits)":
            [queue["total"] for queue in lockstep],
        "lockstep_reference_total_s": [sum(queue["reference"]) for queue in lockstep],
        "lockstep_per_round_ratio": ratios,
    })
    if sequential_queue:
        before, after = (sum(seconds) for seconds in sequential_references)
        result.figures.update({
            "sequential_queue_total_s": sequential_queue[0]["total"],
            "sequential_reference_total_s (before, after)": [before, after],
            "sequential_ratio (whole runs one after the other)": sequential_queue[0]["total"] / ((before + after) / 2),
        })
    result.figures.update(overhead_figures(lockstep, [queue["reference"] for queue in lockstep]))
    result.checks.append(Check(
        f"total time for {count} jobs through Redis + worker vs pipeline loop, in lockstep (median of rounds)",
        value=statistics.median(queue["total"] for queue in lockstep),
        reference=statistics.median(sum(queue["reference"]) for queue in lockstep),
        ratio=ratio, unit="s", target=f"ratio <= {TARGET_RATIO}", passed=ratio <= TARGET_RATIO))
    result.notes.append("queue total includes the `graftq submit` command; the worker runs the jobs while "
                        "the benchmark polls the database every 2 s (the clock is the rows' timestamps, not "
                        "the poll). Per-job overhead leaves out each round's first job, whose wait is the "
                        "submit command (first_job_wait_s)")
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
