"""A process that saves artifacts and is SIGKILLed at random moments (a scenario of docs/reliability.md).

    python -m tests.fault_workload ARTIFACTS_ROOT KILLS SEED

It builds the base model once, then `KILLS` times forks a child that runs `create` jobs (which
only build and save) one after another, and SIGKILLs it after a random delay. Prints one JSON
line: the job ids each child was started for. The test then checks every job directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

BATCH_ID = "killedwhilesaving"


def _job(index: int):
    from jobs.spec import JobSpec

    return JobSpec(task="saved", kind="create", extension=("hybrid", "lora", "layer")[index % 3],
                   base_model="random:t5-tiny", device="cpu", lora={"r": 4, "alpha": 8})


def _save_forever(root: Path, child: int) -> None:
    from worker.pipeline import JobContext, run_job

    index = 0
    while True:
        run_job(JobContext(job_id=f"c{child:02d}j{index:04d}", batch_id=BATCH_ID, spec=_job(index), artifacts_root=root))
        index += 1


def main(root: Path, kills: int, seed: int) -> None:
    import torch

    torch.set_num_threads(1)  # no OpenMP team in the parent: its forked children stay sound
    from worker.pipeline import JobContext, run_job

    # Build (and cache) the base model once; every child inherits it.
    run_job(JobContext(job_id="warmup", batch_id="warmup", spec=_job(0), artifacts_root=root))
    rng = random.Random(seed)
    delays = []
    for child in range(kills):
        pid = os.fork()
        if pid == 0:
            try:
                _save_forever(root, child)
            finally:
                os._exit(1)
        delay = rng.uniform(0.1, 1.2)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        delays.append(round(delay, 3))
    print(json.dumps({"kills": kills, "delays": delays}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
