"""Dispatch overhead: ~1 s training jobs through `graftq submit` + one worker vs the pipeline in a loop.

The jobs are the smallest a user would queue: LoRA `train` jobs of 40 steps on random:t5-tiny
(batch 16, the quickstart's reverse task), about a second each on an idle 2-core machine.

Queue side: a private redis-server, a SQLite file and `graftq worker --gpus none`, started the
way a user starts them; one warm-up job makes the worker import everything and cache the base
model. The clock runs from the start of `graftq submit` until the last job's `finished_at`.

Reference: the same job specs through `worker.pipeline.run_job` in a loop, in a process of its
own warmed up by the same job; the clock runs around the loop.

The machine drifts (other people's tests share it), so the runs alternate: reference, queue,
reference, ...; each queue run is compared with the mean of the reference runs on either side,
and the check is the median of those ratios.

Per-job overhead: for each job but the first, the time it added to the queue's clock (its
`finished_at` less the previous job's) less the reference's time for the same job (mean of the
neighbouring reference runs). The first job's share holds the submit command, reported on its
own. Single jobs are noisy (their run-to-run spread is of the same order): read p50 and p95.
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
    EXAMPLES,
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
TARGET_RATIO = 1.05
PRESET = "random:t5-tiny"
TRAIN = {"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 40, "batch_size": 16, "max_length": 32,
         "learning_rate": 3e-3, "seed": 0}

#: Both sides train on one thread: on a shared 2-core machine, two OpenMP threads per process
#: against other people's load wait on each other and make a job's time swing several-fold.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def job_entries(count: int, prefix: str) -> list[dict]:
    return [{"task": f"{prefix}{index:03d}", "kind": "train", "extension": "lora", "device": "cpu",
             "lora": {"r": 8, "alpha": 16}, "train": TRAIN} for index in range(count)]


REFERENCE_CHILD = """
import json, sys, time
from pathlib import Path
from bench_dispatch import PRESET, job_entries
from jobs.spec import JobSpec
from worker.pipeline import JobContext, run_job

count, root = int(sys.argv[1]), Path(sys.argv[2])
seconds = []
for index, entry in enumerate(job_entries(1, "w") + job_entries(count, "t")):  # the first warms up
    started = time.perf_counter()
    run_job(JobContext(job_id=f"ref{index:04d}", batch_id=f"ref{time.time_ns()}",
                       spec=JobSpec(base_model=PRESET, **entry), artifacts_root=root))
    seconds.append(time.perf_counter() - started)
print(json.dumps(seconds[1:]))
"""


def reference_run(count: int, root: Path) -> list[float]:
    """The benchmark's jobs through `run_job` in a loop, in a fresh process; per-job seconds."""
    completed = subprocess.run([sys.executable, "-c", REFERENCE_CHILD, str(count), str(root)], cwd=BENCH_DIR,
                               env=graftq_env(**ONE_THREAD), capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the reference loop failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def finished_times(database_url: str, batch_id: str) -> list[float]:
    """The jobs' `finished_at` (epoch seconds) in the batch's order; raises unless all succeeded."""
    from db.queries import jobs_of_batch
    from db.session import get_database

    with get_database(database_url).read() as session:
        jobs = jobs_of_batch(session, batch_id)
        failed = [job.id for job in jobs if job.status != "succeeded"]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
        return [job.finished_at.timestamp() for job in jobs]


def queue_run(env: dict[str, str], database_url: str, batch_file: Path, count: int, worker: Worker) -> dict:
    """`graftq submit` of the batch, then wait for the worker: per-job seconds on the queue's clock."""
    started = time.time()
    submit_seconds, batch_id = submit(env, batch_file)
    wait_for_batch(database_url, batch_id, count, timeout=600, worker=worker)
    finished = sorted(finished_times(database_url, batch_id))
    return {"submit_seconds": submit_seconds,
            "seconds": [end - start for start, end in zip([started, *finished], finished)]}


def run(quick: bool) -> Result:
    count = 2 if quick else 32
    queue_rounds = 1 if quick else 3
    result = Result(NAME, f"{count} LoRA train jobs ({TRAIN['max_steps']} steps, {PRESET}) through `graftq submit` + "
                          "one `graftq worker` vs the pipeline function in a loop")
    references: list[list[float]] = []
    queues: list[dict] = []
    with workspace("dispatch") as tmp, redis_server(tmp) as redis:
        database_url = sqlite_url(tmp)
        env = graftq_env(GRAFTQ_DATABASE_URL=database_url, GRAFTQ_BROKER_URL=redis.url,
                         GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"), **ONE_THREAD)
        batch_file = write_batch(tmp / "batch.yaml", "dispatch", job_entries(count, "t"), PRESET)
        worker = Worker(env, tmp / "worker.log")
        worker.start()
        try:
            _, warm_id = submit(env, write_batch(tmp / "warmup.yaml", "warmup", job_entries(1, "w"), PRESET))
            wait_for_batch(database_url, warm_id, 1, timeout=300, worker=worker)
            references.append(reference_run(count, tmp / "reference"))
            for _ in range(queue_rounds):
                queues.append(queue_run(env, database_url, batch_file, count, worker))
                references.append(reference_run(count, tmp / "reference"))
        finally:
            worker.stop()

    # Each queue run against the mean of the reference runs on either side of it, job by job.
    neighbours = [[statistics.mean(pair) for pair in zip(before, after)]
                  for before, after in zip(references, references[1:])]
    ratios = [sum(queue["seconds"]) / sum(reference) for queue, reference in zip(queues, neighbours)]
    overhead = [mine - theirs for queue, reference in zip(queues, neighbours)
                for mine, theirs in zip(queue["seconds"][1:], reference[1:])]
    ratio = statistics.median(ratios)
    ms = 1000.0
    result.figures.update({
        "jobs": count, "queue_rounds": queue_rounds,
        "queue_total_s (submit start -> last finished_at)": [sum(queue["seconds"]) for queue in queues],
        "reference_total_s (runs before, between and after)": [sum(reference) for reference in references],
        "per_round_ratio": ratios,
        "submit_command_s": [queue["submit_seconds"] for queue in queues],
        "reference_s_per_job_median": statistics.median(s for reference in references for s in reference),
        "overhead_ms_per_job_p50": percentile(overhead, 50) * ms,
        "overhead_ms_per_job_p95": percentile(overhead, 95) * ms,
    })
    result.checks.append(Check(
        f"total time for {count} jobs through submit + Redis + worker vs pipeline loop (median of rounds)",
        value=statistics.median(sum(queue["seconds"]) for queue in queues),
        reference=statistics.median(sum(reference) for reference in neighbours),
        ratio=ratio, unit="s", target=f"ratio <= {TARGET_RATIO}", passed=ratio <= TARGET_RATIO))
    result.notes.append("the queue's clock includes the whole `graftq submit` command (submit_command_s); "
                        "per-job overhead is each later job's share of the queue's clock less the same "
                        "job's reference time")
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
