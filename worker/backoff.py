"""OOM back-off: a train job that runs out of accelerator memory while training is run again, in
the same attempt, with a smaller micro-batch and as much more gradient accumulation.

    outcome = run_job(ctx)   # worker.pipeline.run_job, backing off on OutOfMemory

Each back-off halves `train.batch_size` (the largest divisor of it that is at most half, so an
odd micro-batch of 6 goes 3, then 1) and multiplies `train.grad_accum_steps` by the same factor:
the effective batch, and which examples each optimizer step trains on, stay the same
(`worker.data.StepBatches` numbers examples, not micro-batches), so the job resumes from its last
checkpoint and its result is that of the original settings up to float rounding. Steps done
after that checkpoint are trained again. Below micro-batch 1 the job fails with the trainer's
message and what the back-off tried. An out-of-memory error while evaluating is not backed off
(it depends on `train.eval_batch_size`), nor is one outside training (loading the model).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from jobs.spec import JobSpec
from worker import pipeline
from worker.errors import OutOfMemory

log = logging.getLogger(__name__)


def smaller_micro_batch(batch_size: int) -> int | None:
    """The micro-batch after `batch_size` ran out of memory: its largest divisor that is at most
    half of it (None at 1)."""
    return next((size for size in range(batch_size // 2, 0, -1) if batch_size % size == 0), None)


def backed_off(spec: JobSpec, micro_batch: int) -> JobSpec:
    """`spec` training on micro-batches of `micro_batch` examples, with the same effective batch."""
    train = spec.train
    assert train is not None and train.batch_size % micro_batch == 0
    accum = train.grad_accum_steps * (train.batch_size // micro_batch)
    return spec.model_copy(update={"train": train.model_copy(update={"batch_size": micro_batch,
                                                                      "grad_accum_steps": accum})})


def run_job(ctx: pipeline.JobContext,
            run: Callable[[pipeline.JobContext], pipeline.JobOutcome] | None = None) -> pipeline.JobOutcome:
    """`run(ctx)` (default `worker.pipeline.run_job`), run again with a smaller micro-batch after each
    out-of-memory error in training; raises what it raises, and OutOfMemory once micro-batch 1 ran out too."""
    first = ctx.spec.train
    while True:
        try:
            return (run or pipeline.run_job)(ctx)
        except OutOfMemory as error:
            train = ctx.spec.train
            if error.phase != "train" or train is None:
                raise
            smaller = smaller_micro_batch(train.batch_size)
            if smaller is None:
                if first is None or first.batch_size == 1:
                    raise
                raise OutOfMemory(
                    f"{error}. The OOM back-off had already taken train.batch_size from {first.batch_size} to 1 "
                    f"(train.grad_accum_steps from {first.grad_accum_steps} to {train.grad_accum_steps}, the same "
                    f"{first.effective_batch_size} examples per step)", phase=error.phase, step=error.step,
                ) from error
            log.warning("job %s: out of memory at step %s with train.batch_size=%d; running it again from its last "
                        "checkpoint with train.batch_size=%d and train.grad_accum_steps=%d (same effective batch)",
                        ctx.job_id, (error.step or 0) + 1, train.batch_size, smaller,
                        train.grad_accum_steps * (train.batch_size // smaller))
            ctx = dataclasses.replace(ctx, spec=backed_off(ctx.spec, smaller))
