"""Experiment trackers (`train.report_to`), as Hugging Face's Trainer has them: TensorBoard and MLflow.

    trackers = start_trackers(spec, TrackedJob(job_id, batch_id, job_dir, params))
    trackers.log_metrics(step, {"train_loss": 0.4})     # Trainer's on_log feeds this
    trackers.finish(job_dir, {"exact_match": 0.9})      # final metrics and artifacts; None: the job failed

Each tracker has the same three calls: `start(job, spec)`, `log_metrics(step, values)` and
`finish(job_dir, final)`. A tracker whose package is missing fails the job at start with the extra to
install; one that fails later (a tracking server gone) logs a warning and stops tracking, so that
bookkeeping never costs a trained model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec
from worker.errors import JobError

log = logging.getLogger(__name__)

#: where MLflow writes; default a SQLite store (and an artifact folder) in the artifacts directory
MLFLOW_URI_ENV = "GRAFTQ_MLFLOW_TRACKING_URI"
MLFLOW_EXPERIMENT_ENV = "GRAFTQ_MLFLOW_EXPERIMENT"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class TrackedJob:
    job_id: str
    batch_id: str
    #: the job's final artifact directory (written at the end, in one rename)
    job_dir: Path
    #: the `matrix`/`sample` values that made the job (dotted key -> value)
    params: dict[str, Any] = field(default_factory=dict)
    batch_name: str | None = None

    @property
    def artifacts_root(self) -> Path:
        return self.job_dir.parent.parent


class Tracker:
    """One tracker; subclasses fill in the three calls."""

    #: the `train.report_to` name, which is also the pip extra that installs its package
    name = ""

    def start(self, job: TrackedJob, spec: JobSpec) -> None:
        raise NotImplementedError

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, job_dir: Path | None, final: dict[str, float]) -> None:
        """Close the record; `job_dir` is the job's written artifact directory, None when the job failed."""
        raise NotImplementedError


def flat_params(spec: JobSpec, params: dict[str, Any]) -> dict[str, str]:
    """The spec as dotted keys (`lora.r`, `train.learning_rate`) with the sweep's values over it, as strings
    (lists and mappings as JSON); unset (null) keys left out."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif value is not None:
            flat[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", spec.to_json())
    for key, value in params.items():
        flat[key] = value if isinstance(value, str) else json.dumps(value)
    return flat


class TensorBoardTracker(Tracker):
    """Scalars in TensorBoard event files: written next to the job directory while it trains (the
    directory itself appears only when the job is saved), moved into its `tensorboard/` at the end."""

    name = "tensorboard"

    def start(self, job: TrackedJob, spec: JobSpec) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise _missing(self.name, "tensorboard") from error
        self.live_dir = job.job_dir.with_name(f".{job.job_id}.{TENSORBOARD_DIR}")
        self.writer = SummaryWriter(log_dir=str(self.live_dir))
        self.writer.add_text("spec", "```\n" + json.dumps(spec.to_json(), indent=2) + "\n```", 0)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, job_dir: Path | None, final: dict[str, float]) -> None:
        self.writer.close()
        if job_dir is None:
            return  # a retried attempt goes on writing in the same place
        target = job_dir / TENSORBOARD_DIR
        shutil.rmtree(target, ignore_errors=True)
        os.replace(self.live_dir, target)


class MLflowTracker(Tracker):
    """One MLflow run per job, named after its id: the spec (and sweep values) as params, every logged
    value as a metric by step, the final numbers at the last step, and job.json plus the saved adapter/
    block directories as artifacts."""

    name = "mlflow"
    #: MLflow takes at most this many params (and metrics) in one call
    BATCH = 100
    #: metrics are sent in batches, at most this many seconds late
    FLUSH_SECONDS = 5.0

    def start(self, job: TrackedJob, spec: JobSpec) -> None:
        try:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise _missing(self.name, "mlflow-skinny") from error
        uri = os.environ.get(MLFLOW_URI_ENV)
        artifact_location = None
        if not uri:
            job.artifacts_root.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{job.artifacts_root / 'mlflow.db'}"
            artifact_location = (job.artifacts_root / "mlflow-artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get(MLFLOW_EXPERIMENT_ENV) or "graftq"
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(experiment_name, artifact_location=artifact_location))
        tags = {"graftq.job_id": job.job_id, "graftq.batch_id": job.batch_id, "graftq.task": spec.task,
                "graftq.extension": spec.extension, "graftq.base_model": spec.base_model}
        if job.batch_name:
            tags["graftq.batch"] = job.batch_name
        self.run_id = self._run_of(experiment_id, job.job_id)
        if self.run_id is None:  # a retried job goes on in the run of its earlier attempt
            self.run_id = self.client.create_run(experiment_id, run_name=job.job_id, tags=tags).info.run_id
            params = [Param(key, value[:6000]) for key, value in flat_params(spec, job.params).items()]
            for start in range(0, len(params), self.BATCH):
                self.client.log_batch(self.run_id, params=params[start:start + self.BATCH])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.log_batch(self.run_id, tags=[RunTag("graftq.resumed", "true")])
        self.pending: list = []
        self.last_flush = time.monotonic()

    def _run_of(self, experiment_id: str, job_id: str) -> str | None:
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`graftq.job_id` = '{job_id}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(name, float(value), now, step) for name, value in values.items()]
        if len(self.pending) >= self.BATCH or time.monotonic() - self.last_flush >= self.FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        while self.pending:
            chunk, self.pending = self.pending[:self.BATCH], self.pending[self.BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self.last_flush = time.monotonic()

    def finish(self, job_dir: Path | None, final: dict[str, float]) -> None:
        self._flush()
        if job_dir is None:
            self.client.set_terminated(self.run_id, status="FAILED")
            return
        for path in sorted(job_dir.iterdir()):
            if path.name == TENSORBOARD_DIR:
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED")


TRACKERS: dict[str, type[Tracker]] = {tracker.name: tracker for tracker in (TensorBoardTracker, MLflowTracker)}


def _missing(name: str, package: str) -> JobError:
    return JobError(f"train.report_to: {name} needs the `{package}` package, which this worker lacks: install "
                    f"graftq's extra with `pip install 'graftq[{name}]'`, or take {name} out of report_to")


class Trackers:
    """The job's trackers, called together; a tracker that fails after its start is dropped with a warning."""

    def __init__(self, trackers: list[Tracker], final_step: int = 0):
        self.trackers = trackers
        self.step = final_step

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.step = max(self.step, step)
        self._each("log_metrics", step, values)

    def finish(self, job_dir: Path | None, final: dict[str, float] | None = None) -> None:
        """Log `final` (numbers; None values left out) at the last step, then close every tracker."""
        final = {name: float(value) for name, value in (final or {}).items()
                 if isinstance(value, int | float) and not isinstance(value, bool)}
        if final and job_dir is not None:
            self._each("log_metrics", self.step, final)
        self._each("finish", job_dir, final)
        self.trackers = []

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception:  # a tracker's own failure: the job goes on without it
                log.warning("train.report_to: %s failed in %s; it stops tracking this job", tracker.name, call,
                            exc_info=True)
                self.trackers.remove(tracker)


def start_trackers(spec: JobSpec, job: TrackedJob) -> Trackers:
    """Start the trackers `spec.train.report_to` names (none for a create job). Raises JobError when a
    tracker's package is missing; a tracker that fails otherwise at start fails the job too."""
    names = spec.train.report_to if spec.train is not None else []
    started: list[Tracker] = []
    try:
        for name in names:
            tracker = TRACKERS[name]()
            try:
                tracker.start(job, spec)
            except JobError:
                raise
            except Exception as error:
                raise JobError(f"train.report_to: {name} could not start: {error}") from error
            started.append(tracker)
    except BaseException:
        Trackers(started).finish(None)
        raise
    return Trackers(started)
