"""The job pipeline: one plain function that the Celery task (and `graftq run`) calls.

    outcome = run_job(JobContext(job_id=..., batch_id=..., spec=spec, artifacts_root=...))

It builds the extension on the base model, trains it (train jobs), saves the artifacts
under `<artifacts_root>/<batch_id>/<job_id>/` atomically, and returns a `JobOutcome`.
Raises `worker.errors.JobError` (deterministic, never retried), `JobCancelled`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec


@dataclass
class Progress:
    """One progress report: `step` of `total_steps`, the latest training loss."""

    step: int
    total_steps: int
    loss: float | None = None
    phase: str = "train"  # "setup", "train", "eval", "save"


@dataclass
class JobContext:
    job_id: str
    batch_id: str
    spec: JobSpec
    artifacts_root: Path
    #: called with a Progress now and then (at most every `progress_interval` seconds while training)
    on_progress: Callable[[Progress], None] | None = None
    #: polled between steps; returning True stops the job with JobCancelled
    should_cancel: Callable[[], bool] | None = None
    #: where resumable training checkpoints go; None disables checkpointing
    checkpoint_dir: Path | None = None
    progress_interval: float = 1.0

    @property
    def job_dir(self) -> Path:
        return self.artifacts_root / self.batch_id / self.job_id


@dataclass
class JobOutcome:
    """What a finished job records: the keys match DESIGN.md's result fields."""

    stats: dict[str, Any]  # base_params, total_params, trainable_params, lora_params, layer_params, trainable_pct
    metrics: dict[str, Any]  # train_loss, eval_loss, steps, tokens_per_second, train_seconds, peak_memory_mb
    device: str
    dtype: str
    versions: dict[str, str]
    job_dir: str
    adapter_path: str | None = None
    layer_path: str | None = None
    #: the loss curve: (step, split, loss) with split "train" or "eval"
    loss_curve: list[tuple[int, str, float]] = field(default_factory=list)
    setup_seconds: float = 0.0
