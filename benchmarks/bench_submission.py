"""Submission: `graftq submit` of a 10,000-job batch vs a loop of Celery `send_task` calls.

graftq side: the whole `graftq submit BATCH` command as a user runs it (process start, YAML
load, validation of every job, one transaction of 10,000 rows, 10,000 messages on Redis,
`published_at` recorded), wall time; jobs/second = jobs / that time.

Reference: in this process (imports already paid, no database, nothing validated), graftq's
own Celery app configured for the same Redis, and one `app.send_task("graftq.run_job",
args=[job_id], queue=...)` call per job, the way one enqueues by hand. Each side runs on a
fresh private redis-server database (flushed between rounds) and a fresh SQLite file; rounds
alternate the order.
"""

from __future__ import annotations

import time
import uuid

from _common import (
    Check,
    Result,
    graftq_env,
    main,
    median,
    redis_server,
    sqlite_url,
    submit,
    workspace,
    write_batch,
)

NAME = "submission"
TARGET_RATIO = 1.0


def reference_send(broker_url: str, count: int) -> float:
    """Seconds for `count` plain send_task calls on graftq's Celery app."""
    from jobs.celery_app import RUN_JOB_TASK, configure
    from jobs.settings import Settings

    app = configure(Settings(broker_url=broker_url))
    ids = [uuid.uuid4().hex[:16] for _ in range(count)]
    app.send_task(RUN_JOB_TASK, args=["warmup"], queue="graftq.cpu", ignore_result=True)  # connect first
    started = time.perf_counter()
    for job_id in ids:
        app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue="graftq.cpu", ignore_result=True)
    return time.perf_counter() - started


def run(quick: bool) -> Result:
    count = 2_000 if quick else 10_000
    rounds = 1 if quick else 2
    result = Result(NAME, f"`graftq submit` of a {count:,}-job batch vs {count:,} Celery send_task calls, "
                          "same Redis")
    graftq_rates, reference_rates = [], []
    with workspace("submit") as tmp, redis_server(tmp) as redis:
        client = redis.client()
        jobs = [{"task": f"t{index:05d}", "kind": "create", "extension": ["lora", "layer", "hybrid"][index % 3],
                 "device": "cpu"} for index in range(count)]
        batch_file = write_batch(tmp / "batch.yaml", "submission", jobs)
        for index in range(rounds):
            for side in (["graftq", "reference"] if index % 2 == 0 else ["reference", "graftq"]):
                client.flushall()
                if side == "graftq":
                    env = graftq_env(GRAFTQ_DATABASE_URL=sqlite_url(tmp / f"round{index}"),
                                     GRAFTQ_BROKER_URL=redis.url, GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"))
                    (tmp / f"round{index}").mkdir()
                    seconds, _ = submit(env, batch_file)
                    queued = redis.queue_lengths()["graftq.cpu"]
                    if queued != count:
                        raise RuntimeError(f"graftq submit left {queued} messages on graftq.cpu, not {count}")
                    graftq_rates.append(count / seconds)
                else:
                    reference_rates.append(count / reference_send(redis.url, count))
        client.flushall()
    ratio = median(graftq_rates) / median(reference_rates)
    result.figures.update({"jobs": count, "graftq_jobs_per_s": graftq_rates,
                           "reference_jobs_per_s": reference_rates,
                           "graftq_submit_s": [count / rate for rate in graftq_rates],
                           "reference_loop_s": [count / rate for rate in reference_rates]})
    result.checks.append(Check(
        f"jobs/second, graftq submit ({count:,} jobs, whole command) vs send_task loop",
        value=median(graftq_rates), reference=median(reference_rates), ratio=ratio, unit="jobs/s",
        target=f"ratio >= {TARGET_RATIO}", passed=ratio >= TARGET_RATIO))
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
