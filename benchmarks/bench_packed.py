"""Packed training: 8 small LoRA jobs on one base model, `graftq run --pack 4` against `--pack 1`.

Both sides are the same batch run by `graftq run` (the task's code path: claims, heartbeats,
outcomes), each in a fresh process, alternating pack 1 / pack 4 so that both see the same
machine. The jobs differ in data, seed, learning rate and rank, as a sweep's do.

The batch starts with one short job that never packs (a `layer` job on the same base): a fresh
process pays its imports of torch, transformers and PEFT (about 8 s here) and the base model's
first load in that job, as a long-running worker pays them once for a whole sweep. The figure is
the 8 sweep jobs per hour, from the first one's start to the last one's end (the recorded
`started_at` / `finished_at`). The same ratio with the warm-up job inside the window (a cold
process's 9 jobs) is reported too.

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
#: the first job of the batch, outside the measured window: the process's imports and first model load
WARM_UP = "warm-up"


def _batch(path: Path, steps: int, device: str) -> Path:
    warm_up = {"task": WARM_UP, "extension": "layer", "train": {"dataset": str(EXAMPLES / "reverse.jsonl"),
                                                                  "max_steps": 2}}
    jobs = [warm_up] + [{"task": f"sweep{i}", "extension": "lora", "lora": {"r": (4, 8)[i % 2], "alpha": 16},
                         "train": {"dataset": str(EXAMPLES / f"{DATASETS[i % 4]}.jsonl"), "seed": i,
                                   "learning_rate": (1e-3, 3e-3)[i % 2]}} for i in range(8)]
    defaults = {"device": device, "train": {"max_steps": steps, "batch_size": 8, "max_length": 32,
                                            "checkpoint_every": 0}}
    return write_batch(path, "packed", jobs, base_model=f"random:{PRESET}", defaults=defaults)


def _jobs_per_hour(directory: Path, pack: int, batch: Path) -> tuple[float, float, float]:
    """Sweep jobs per hour (wall time, first start to last end); the same with the warm-up job in the
    window; all jobs per hour of the process's CPU time."""
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
        rows = connection.execute(text("SELECT task, status, started_at, finished_at, packed_with FROM jobs")).all()
    engine.dispose()
    if any(row.status != "succeeded" for row in rows):
        raise RuntimeError(f"--pack {pack}: not every job succeeded: {[row.status for row in rows]}")
    import datetime as dt

    def parse(value):
        return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))

    def per_hour(chosen) -> float:
        seconds = (max(parse(r.finished_at) for r in chosen) - min(parse(r.started_at) for r in chosen))
        return len(chosen) * 3600 / seconds.total_seconds()

    sweep = [row for row in rows if row.task != WARM_UP]
    if pack > 1 and not all(row.packed_with for row in sweep):
        raise RuntimeError(f"--pack {pack}: not every sweep job ran packed: {[row.task for row in sweep]}")
    return per_hour(sweep), per_hour(rows), len(rows) * 3600 / cpu


def run(quick: bool) -> Result:
    device = os.environ.get("GRAFTQ_BENCH_DEVICE", "cpu")
    steps = 20 if quick else 80
    rounds = 1 if quick else 2
    result = Result(NAME, f"8 LoRA jobs of {steps} steps on random:{PRESET} ({device}), graftq run --pack 4 vs "
                          "--pack 1 after a warm-up job, jobs per hour (first start to last end)")
    alone, packed, ratios, cold_ratios, cpu_ratios = [], [], [], [], []
    with workspace("packed") as directory:
        batch = _batch(directory / "batch.yaml", steps, device)
        for _ in range(rounds):
            one, one_cold, one_cpu = _jobs_per_hour(directory, 1, batch)
            four, four_cold, four_cpu = _jobs_per_hour(directory, 4, batch)
            alone.append(one)
            packed.append(four)
            ratios.append(four / one)
            cold_ratios.append(four_cold / one_cold)
            cpu_ratios.append(four_cpu / one_cpu)
    ratio = median(ratios)
    result.figures.update({"device": device, "steps_per_job": steps, "rounds": rounds,
                           "jobs_per_hour_pack1": alone, "jobs_per_hour_pack4": packed, "ratios": ratios,
                           # the warm-up job (imports, first model load) inside the window
                           "ratios_with_warm_up": cold_ratios,
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
