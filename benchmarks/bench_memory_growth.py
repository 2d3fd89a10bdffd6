"""Worker memory: RSS over 50 sequential jobs in one process.

A worker runs jobs one after another for days; whatever one job leaves behind (a model, an
optimizer, a loss curve, a cache entry) adds up. This runs 50 train jobs on random:t5-tiny
(lora, layer and hybrid in turn, 12 steps each, with evaluation and saved artifacts) through
`worker.pipeline.run_job` in one process and reads the resident set size after each job. The
growth per job is the least-squares slope of RSS over the jobs after the first (the RSS after
the first job is the baseline: imports, the cached base model, allocator pools); the plain
(last - first) / (jobs - 1) is shown too.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from _common import EXAMPLES, Check, Result, main, rss_mb

NAME = "memory_growth"
TARGET_MB_PER_JOB = 1.0
KINDS = ["lora", "layer", "hybrid"]


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0..n-1."""
    n = len(ys)
    mean_x = (n - 1) / 2
    mean_y = sum(ys) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


def run(quick: bool) -> Result:
    import torch

    from jobs.spec import JobSpec
    from worker.pipeline import JobContext, run_job

    # Speed is not measured here: one thread keeps this quick on a busy shared machine.
    torch.set_num_threads(1)
    jobs = 15 if quick else 50
    result = Result(NAME, f"RSS of one process over {jobs} sequential train jobs (random:t5-tiny, 12 steps, "
                          "lora/layer/hybrid in turn)")
    rss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="graftq-bench-memory-") as tmp:
        for index in range(jobs):
            kind = KINDS[index % len(KINDS)]
            spec = JobSpec(task="reverse", kind="train", extension=kind, base_model="random:t5-tiny",
                           device="cpu", train={"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 12,
                                                "batch_size": 8, "checkpoint_every": 5})
            outcome = run_job(JobContext(job_id=f"job{index}", batch_id="bench", spec=spec,
                                         artifacts_root=Path(tmp)))
            del outcome
            gc.collect()
            rss.append(rss_mb())
    per_job_slope = slope(rss[1:]) if len(rss) > 2 else float("nan")
    per_job_mean = (rss[-1] - rss[0]) / (len(rss) - 1)
    result.figures.update({
        "jobs": jobs, "rss_after_first_job_mb": rss[0], "rss_after_last_job_mb": rss[-1],
        "rss_mb_every_5th_job": rss[::5],
        "growth_mb_per_job_last_minus_first": per_job_mean,
    })
    result.checks.append(Check(
        f"RSS growth per job (least-squares slope after the first job; RSS after it {rss[0]:.0f} MB)",
        value=per_job_slope, unit="MB/job", target=f"< {TARGET_MB_PER_JOB} MB/job",
        passed=per_job_slope < TARGET_MB_PER_JOB))
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
