"""Model reuse: 20 jobs on random:flan-t5-small in one worker process.

The first job builds the base model (random:flan-t5-small has google/flan-t5-small's exact
architecture, 77M parameters); the later ones should take it from the worker's base-model cache
(`worker.models.BASE_MODELS`) and pay only for a structural copy plus their own extension. The
figure is `JobOutcome.setup_seconds` (base model + extension built, statistics counted) of each
job, the later jobs against the first. The jobs rotate through lora, layer and hybrid `create`
jobs, as a worker serving a mixed batch would.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import Check, Result, main, median

NAME = "model_reuse"
PRESET = "flan-t5-small"
TARGET_RATIO = 0.2
KINDS = ["lora", "layer", "hybrid"]


def run(quick: bool) -> Result:
    from jobs.spec import JobSpec
    from worker.models import BASE_MODELS
    from worker.pipeline import JobContext, run_job

    jobs = 6 if quick else 20
    result = Result(NAME, f"{jobs} create jobs (lora/layer/hybrid in turn) on random:{PRESET} in one process, "
                          "set-up time of later jobs vs the first")
    BASE_MODELS.clear()
    setups: list[float] = []
    kinds: list[str] = []
    with tempfile.TemporaryDirectory(prefix="graftq-bench-reuse-") as tmp:
        for index in range(jobs):
            kind = KINDS[index % len(KINDS)]
            spec = JobSpec(task=f"t{index}", kind="create", extension=kind, base_model=f"random:{PRESET}",
                           device="cpu")
            outcome = run_job(JobContext(job_id=f"job{index}", batch_id="bench", spec=spec,
                                         artifacts_root=Path(tmp)))
            setups.append(outcome.setup_seconds)
            kinds.append(kind)
    first, later = setups[0], setups[1:]
    ratio_median = median(later) / first
    ratio_max = max(later) / first
    result.figures.update({
        "jobs": jobs, "cache_hits": BASE_MODELS.hits, "cache_misses": BASE_MODELS.misses,
        "setup_s_per_job": setups,
        **{f"later_{kind}_setup_s_median": median([s for s, k in zip(later, kinds[1:]) if k == kind])
           for kind in KINDS},
        "later_setup_s_max": max(later),
        "ratio_of_slowest_later_job": ratio_max,
    })
    result.checks.append(Check(
        "set-up time of later jobs (median) vs the first job", value=median(later), reference=first,
        ratio=ratio_median, unit="s", target=f"ratio <= {TARGET_RATIO}", passed=ratio_median <= TARGET_RATIO))
    result.checks.append(Check(
        "set-up time of the slowest later job vs the first job", value=max(later), reference=first,
        ratio=ratio_max, unit="s", target=f"ratio <= {TARGET_RATIO}", passed=ratio_max <= TARGET_RATIO))
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
