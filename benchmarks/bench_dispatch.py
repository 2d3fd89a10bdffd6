"""Dispatch overhead: 200 `create` jobs through Redis and one worker vs the same jobs in a loop.

Queue side: a private redis-server, a SQLite file, and `graftq worker --gpus none` started
the way a user starts it. One warm-up batch (one job of each extension kind) makes the worker
import everything and cache the base model. Then `graftq submit` sends 200 create jobs on
random:t5-tiny (lora, layer and hybrid in turn) and the clock runs from the start of the
submit command until the last job's `finished_at` in the database.

Reference: the same 200 job specs run by calling `worker.pipeline.run_job` in a loop, in a
fresh process of its own (warmed up like the worker), once before and once after each queue
run. A fresh process, like the worker's: this one accumulates
objects of its own (database polling) that would slow every garbage collection of a loop
run here, and flatter the queue. The full run alternates reference, queue, reference, queue,
reference; each queue round is held against the reference runs on either side of it, and the
ratio is the median over rounds (a shared machine drifts by 10-20% within a minute).

Per-job overhead: the worker's pipeline calls are timed from inside the worker (see
`_shim/sitecustomize.py`), so everything else the worker does for a job is graftq's dispatch:
  fetch + claim = previous job recorded (its `finished_at`) -> this job claimed (`started_at`),
  start         = claimed -> pipeline starts (spec read, heartbeat thread, context),
  record        = pipeline returned -> `finished_at` (outcome, stats, loss curve written),
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


def job_rows(database_url: str, batch_id: str) -> list[dict]:
    from sqlalchemy import select

    from db.models import Job
    from db.session import get_database

    with get_database(database_url).read() as session:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.started_at)).all()
        return [{"id": job.id, "task": job.task, "status": job.status, "published_at": job.published_at,
                 "started_at": job.started_at, "finished_at": job.finished_at} for job in jobs]


def queue_round(env: dict[str, str], database_url: str, batch_file: Path, count: int, worker: Worker,
                timings: Path) -> dict:
    """`graftq submit` of the batch, then wait for the worker: the round's clock, rows and timings."""
    timings.unlink(missing_ok=True)
    t0 = time.time()
    submit_seconds, batch_id = submit(env, batch_file)
    wait_for_batch(database_url, batch_id, count, timeout=900, worker=worker, poll=0.5)
    rows = job_rows(database_url, batch_id)
    failed = [row["id"] for row in rows if row["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}: {worker.tail()}")
    pipeline = {}
    for line in timings.read_text().splitlines():
        record = json.loads(line)
        pipeline[record["job_id"]] = record
    return {"t0": t0, "submit_seconds": submit_seconds, "rows": rows, "pipeline": pipeline,
            "total": max(row["finished_at"].timestamp() for row in rows) - t0}


def run(quick: bool) -> Result:
    count = 40 if quick else 200
    rounds = 1 if quick else 3
    result = Result(NAME, f"{count} create jobs on {PRESET} through Redis + one `graftq worker` vs the "
                          "pipeline function in a loop")
    with workspace("dispatch") as tmp, redis_server(tmp) as redis:
        database_url = sqlite_url(tmp)
        timings = tmp / "pipeline-timings.jsonl"
        env = graftq_env(GRAFTQ_DATABASE_URL=database_url, GRAFTQ_BROKER_URL=redis.url,
                         GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"), GRAFTQ_BENCH_TIMINGS=str(timings))
        env["PYTHONPATH"] = f"{BENCH_DIR / '_shim'}:{env['PYTHONPATH']}"
        batch_file = write_batch(tmp / "batch.yaml", "dispatch", job_entries(count, "t"), PRESET)

        # Rounds alternate: reference, queue, reference, queue, ..., reference. Each queue round
        # is held against the mean of the reference runs on either side of it, which cancels
        # most of the drift of a shared machine; the idle worker waits on Redis meanwhile.
        worker = Worker(env, tmp / "worker.log")
        worker.start()
        references: list[list[float]] = []
        queues: list[dict] = []
        try:
            warm = write_batch(tmp / "warmup.yaml", "warmup", job_entries(3, "w"), PRESET)
            _, warm_id = submit(env, warm)
            wait_for_batch(database_url, warm_id, 3, timeout=300, worker=worker)
            references.append(reference_in_fresh_process(count, tmp / "ref-artifacts"))
            for _ in range(rounds):
                queues.append(queue_round(env, database_url, batch_file, count, worker, timings))
                references.append(reference_in_fresh_process(count, tmp / "ref-artifacts"))
        finally:
            worker.stop()

    reference_totals = [sum(seconds) for seconds in references]
    ratios = [queue["total"] / statistics.mean(reference_totals[index:index + 2])
              for index, queue in enumerate(queues)]
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
            record.append(finished - timing["end"])
            pipeline_seconds.append(timing["end"] - timing["start"])
            kinds_on_worker[KINDS[int(row["task"][1:]) % len(KINDS)]].append(pipeline_seconds[-1])
            if index:
                overhead.append(fetch_claim[-1] + start[-1] + record[-1])
            previous_finished = finished
    all_reference = [seconds for run in references for seconds in run]
    ms = 1000.0
    ratio = statistics.median(ratios)
    result.figures.update({
        "jobs": count, "rounds": rounds,
        "submit_command_s": [queue["submit_seconds"] for queue in queues],
        "queue_total_s (submit start -> last finished_at)": [queue["total"] for queue in queues],
        "reference_total_s (runs around the queue rounds)": reference_totals,
        "per_round_ratio": ratios,
        "pipeline_s_per_job_on_worker_median": statistics.median(pipeline_seconds),
        "pipeline_s_per_job_in_reference_median": statistics.median(all_reference),
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
    })
    result.checks.append(Check(
        f"total time for {count} jobs through Redis + worker vs pipeline loop (median of rounds)",
        value=statistics.median(queue["total"] for queue in queues), reference=statistics.mean(reference_totals),
        ratio=ratio, unit="s", target=f"ratio <= {TARGET_RATIO}", passed=ratio <= TARGET_RATIO))
    result.notes.append("queue total includes the `graftq submit` command; the worker runs the jobs while "
                        "the benchmark polls the database every 0.5 s. Per-job overhead leaves out each "
                        "round's first job, whose wait is the submit command (first_job_wait_s)")
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
