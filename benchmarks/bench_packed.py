"""Packed training: 8 small LoRA jobs on one base model, `graftq run --pack 4` against `--pack 1`.

Both sides are the same 8-job batch run by `graftq run` (the task's code path: claims, heartbeats,
outcomes), each in a fresh process, alternating pack 1 / pack 4 so that both see the same
machine. The figure is jobs per hour from the first job's start to the last job's end (the
recorded `started_at` / `finished_at`), which leaves the process start-up out of both sides.
The jobs differ in data, seed, learning rate and rank, as a sweep's do.

    python benchmarks/bench_packed.py [--quick] [--device cuda]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from _common import (
    EXAMPLES,
    Check,
    Result,
    graftq_argv,
    graftq_env,
    main,
    median,
    sqlite_url,
    time_command,
    workspace,
    write_batch,
)

NAME = "packed"
TARGET_RATIO = 1.5
PRESET = "t5-tiny"
DATASETS = ["reverse", "uppercase", "sort_digits", "reverse"]


def _batch(path: Path, steps: int, device: str) -> Path:
    jobs = [{"task": f"sweep{i}", "extension": "lora", "lora": {"r": (4, 8)[i % 2], "alpha": 16},
             "train": {"dataset": str(EXAMPLES / f"{DATASETS[i % 4]}.jsonl"), "seed": i,
                       "learning_rate": (1e-3, 3e-3)[i % 2]}} for i in range(8)]
    defaults = {"device": device, "train": {"max_steps": steps, "batch_size": 8, "max_length": 32,
                                            "checkpoint_every": 0}}
    return write_batch(path, "packed", jobs, base_model=f"random:{PRESET}", defaults=defaults)


def _jobs_per_hour(directory: Path, pack: int, batch: Path) -> tuple[float, float]:
    """(jobs per hour of wall time, first start to last end; jobs per hour of the process's CPU time)."""
    run_dir = directory / f"run{len(list(directory.glob('run*')))}-pack{pack}"
    run_dir.mkdir()
    url = sqlite_url(run_dir)
    env = graftq_env(GRAFTQ_DATABASE_URL=url, GRAFTQ_ARTIFACTS_DIR=str(run_dir / "artifacts"),
                     OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    time_command(graftq_argv("run", str(batch), "--pack", str(pack)), env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT status, started_at, finished_at, packed_with FROM jobs")).all()
    engine.dispose()
    if any(row.status != "succeeded" for row in rows):
        raise RuntimeError(f"--pack {pack}: not every job succeeded: {[row.status for row in rows]}")
    import datetime as dt

    def parse(value):
        return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))

    seconds = (max(parse(r.finished_at) for r in rows) - min(parse(r.started_at) for r in rows)).total_seconds()
    return len(rows) * 3600 / seconds, len(rows) * 3600 / cpu


def run(quick: bool) -> Result:
    device = os.environ.get("GRAFTQ_BENCH_DEVICE", "cpu")
    steps = 20 if quick else 80
    rounds = 1 if quick else 2
    result = Result(NAME, f"8 LoRA jobs of {steps} steps on random:{PRESET} ({device}), graftq run --pack 4 vs "
                          "--pack 1, jobs per hour (first start to last end)")
    alone, packed, ratios, cpu_ratios = [], [], [], []
    with workspace("packed") as directory:
        batch = _batch(directory / "batch.yaml", steps, device)
        for _ in range(rounds):
            one, one_cpu = _jobs_per_hour(directory, 1, batch)
            four, four_cpu = _jobs_per_hour(directory, 4, batch)
            alone.append(one)
            packed.append(four)
            ratios.append(four / one)
            cpu_ratios.append(four_cpu / one_cpu)
    ratio = median(ratios)
    result.figures.update({"device": device, "steps_per_job": steps, "rounds": rounds,
                           "jobs_per_hour_pack1": alone, "jobs_per_hour_pack4": packed, "ratios": ratios,
                           # CPU time of the whole `graftq run` process (start-up included): steadier than
                           # wall time on a machine shared with other work
                           "cpu_time_ratios": cpu_ratios})
    result.checks.append(Check("jobs per hour, --pack 4 vs --pack 1 (median of rounds)", value=median(packed),
                               reference=median(alone), ratio=ratio, unit="jobs/h",
                               target=f"ratio >= {TARGET_RATIO}", passed=ratio >= TARGET_RATIO))
    return result


if __name__ == "__main__":
    if "--device" in sys.argv:  # `--device cuda`: the GPU figure
        index = sys.argv.index("--device")
        os.environ["GRAFTQ_BENCH_DEVICE"] = sys.argv[index + 1]
        del sys.argv[index:index + 2]
    raise SystemExit(main(NAME, run))
