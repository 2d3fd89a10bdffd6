"""The job pipeline: one plain function that the Celery task (and `graftq run`) calls.

    outcome = run_job(JobContext(job_id=..., batch_id=..., spec=spec, artifacts_root=...))

It builds the extension on the base model, trains it (train jobs), saves the artifacts
under `<artifacts_root>/<batch_id>/<job_id>/` atomically, and returns a `JobOutcome`. With an
`s3://` artifacts_root the job is written in this host's artifacts cache, and its checkpoints and
artifacts are committed to the bucket (worker.storage).
A job that builds on other jobs (`layer.from`, `lora.from`: `job:ID`) is handed their artifact
directories in `JobContext.needed_dirs` (the task reads them with `needed_dirs(spec, database)`).
Raises `worker.errors.JobError` (deterministic, never retried), `JobCancelled` (the cancel
check said stop), `JobInterrupted` (the worker is shutting down: a checkpoint was saved first).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.extensions import EXTENSION_KINDS
from jobs.metrics import resolve_objective
from jobs.spec import JOB_REF_RE, JobKind, JobSpec, resolve_train
from worker.artifacts import job_directory, write_atomically, write_job_json
from worker.errors import JobCancelled, JobError
from worker.storage import JobStore, local_copy, local_root

log = logging.getLogger(__name__)


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
    #: a local directory, or `s3://bucket/prefix` (the job is written locally first: worker.storage)
    artifacts_root: Path | str
    #: called with a Progress now and then (at most every `progress_interval` seconds while training)
    on_progress: Callable[[Progress], None] | None = None
    #: polled between steps; returning True stops the job with JobCancelled
    should_cancel: Callable[[], bool] | None = None
    #: where resumable training checkpoints go (default: next to the job directory);
    #: `train.checkpoint_every: 0` disables them
    checkpoint_dir: Path | None = None
    progress_interval: float = 1.0
    #: job id -> artifact directory of each job that the spec's `from` keys name (`job:ID`)
    needed_dirs: dict[str, Path] = field(default_factory=dict)
    #: the `matrix`/`sample` values that made the job, and its batch's name: for the trackers (`train.report_to`)
    params: dict[str, Any] = field(default_factory=dict)
    batch_name: str | None = None

    @property
    def job_dir(self) -> Path:
        return job_directory(local_root(self.artifacts_root), self.batch_id, self.job_id)

    @property
    def resume_dir(self) -> Path:
        return self.checkpoint_dir or self.job_dir.with_name(f".{self.job_id}.checkpoint")


@dataclass
class JobOutcome:
    """What a finished job records: the keys are result fields (`db.tables.FIELDS`)."""

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
    #: task metrics on the eval split (`train.metrics`): name -> value
    task_metrics: dict[str, float] = field(default_factory=dict)
    #: up to `train.num_samples` eval rows' {input, target, prediction}; None when none
    samples: list[dict[str, str]] | None = None
    #: the task metrics' curves (train.eval_every): (step, metric, value)
    metric_curve: list[tuple[int, str, float]] = field(default_factory=list)
    #: per `eval.datasets` set: {eval_loss, metric: value}
    eval_sets: dict[str, dict[str, float]] = field(default_factory=dict)


def parent_refs(spec: JobSpec) -> dict[str, str]:
    """{section: its `from` value} for the sections of the job's kind that start from another job."""
    sections = {name: getattr(spec, name, None) for name in EXTENSION_KINDS[spec.extension].sections}
    return {name: section.from_ for name, section in sections.items() if getattr(section, "from_", None)}


def _parent_id(section: str, ref: str) -> str:
    match = JOB_REF_RE.fullmatch(ref)
    if match is None:
        raise JobError(f"{section}.from: {ref!r} reached the worker unresolved; it must be `job:ID` by the time "
                       "the job runs (submit the batch again)")
    return match[1]


def needed_dirs(spec: JobSpec, database: Any) -> dict[str, Path]:
    """The artifact directories of the jobs that `spec`'s `from` keys name, read from `database`
    (a db.session.Database). Raises JobError naming a parent that has not succeeded (and its status)."""
    refs = parent_refs(spec)
    if not refs:
        return {}
    from db.queries import job_dirs
    from db.tables import JobStatus

    ids = {section: _parent_id(section, ref) for section, ref in refs.items()}
    with database.read() as connection:
        found = job_dirs(connection, sorted(set(ids.values())))
    dirs: dict[str, Path] = {}
    for section, job_id in ids.items():
        status, directory = found.get(job_id, (None, None))
        if status is None:
            raise JobError(f"{section}.from: job {job_id} does not exist")
        if status != JobStatus.SUCCEEDED.value or directory is None:
            raise JobError(f"{section}.from: job {job_id} is {status}; a job can only build on the artifacts of a "
                           "job that succeeded")
        dirs[job_id] = local_copy(directory)
    return dirs


def _start_from(spec: JobSpec, given: dict[str, Path]) -> dict[str, Path]:
    """{section: the directory of the job it starts from}, from the spec's `from` keys and `given` dirs."""
    start_from = {}
    for section, ref in parent_refs(spec).items():
        job_id = _parent_id(section, ref)
        if job_id not in given:
            raise JobError(f"{section}.from: the artifacts of job {job_id} were not handed to this job")
        start_from[section] = Path(given[job_id])
    return start_from


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


_startup_frozen = False


def _freeze_startup_objects() -> None:
    """Move everything alive after the ML imports into the GC's permanent generation, once.

    It pays on one-second training jobs: the full collection after every job
    (DeviceManager.release) would otherwise walk the hundreds of thousands of objects that
    torch + transformers + peft leave behind. Frozen objects are never freed, which is right
    for modules and their globals.
    """
    global _startup_frozen
    if not _startup_frozen:
        gc.collect()
        gc.freeze()
        _startup_frozen = True


def run_job(ctx: JobContext) -> JobOutcome:
    """Build, (train,) save one job. See the module docstring for what is raised."""
    try:
        return _on_own_thread(_run_job, ctx)
    except BaseException as error:
        # The traceback's frames hold the failed job's model, optimizer and graph: drop their
        # locals and free the memory, so that this worker runs its next job with all of it.
        from worker.device import release_memory

        _clear_frames(error)
        release_memory()
        raise


def _on_own_thread(run: Callable[[JobContext], JobOutcome], ctx: JobContext) -> JobOutcome:
    """`run(ctx)` on a thread of its own; returns or raises what it did.

    A new thread starts with an empty frame stack, so the job runs as in a plain loop whatever
    its caller's depth: from a Celery worker's deep stack, CPython maps and unmaps frame-stack
    chunks as the job's calls cross their boundaries (benchmarks/README.md, `dispatch`).
    Interrupted while it waits (Ctrl-C), the job is told to stop at its next step.
    """
    stop = threading.Event()
    asked = ctx.should_cancel or (lambda: False)
    ctx = dataclasses.replace(ctx, should_cancel=lambda: stop.is_set() or asked())
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["outcome"] = run(ctx)
        except BaseException as error:  # handed to the caller's thread below
            result["error"] = error

    thread = threading.Thread(target=target, name=f"graftq-job-{ctx.job_id}", daemon=True)
    thread.start()
    try:
        thread.join()
    except BaseException:
        stop.set()
        thread.join(timeout=30)
        raise
    if "error" in result:
        raise result.pop("error")
    return result["outcome"]


def _clear_frames(error: BaseException) -> None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def resolve_objective_of(spec: JobSpec) -> tuple[JobSpec, str]:
    """(`spec` with `train.objective` and `train.metrics` resolved for its base, the objective).

    A create job gets the objective of its base's family: the model a train job would build.
    Raises JobError for an objective or a metric the base cannot have.
    """
    from worker.models import base_task_type

    task_type = base_task_type(spec.base_model)
    if task_type is None:  # the base cannot be read: loading it reports why
        return spec, spec.train.objective if spec.train is not None else None
    try:
        if spec.train is None:
            return spec, resolve_objective(task_type, None)
        train = resolve_train(spec.train, task_type)
    except ValueError as error:
        raise JobError(str(error)) from None
    return spec.model_copy(update={"train": train}), train.objective


def _run_job(ctx: JobContext) -> JobOutcome:
    """`_build_train_save`, reported to the job's trackers (`train.report_to`)."""
    from worker.trackers import TrackedJob, start_trackers

    trackers = start_trackers(ctx.spec, TrackedJob(ctx.job_id, ctx.batch_id, ctx.job_dir, ctx.params, ctx.batch_name))
    try:
        outcome = _build_train_save(ctx, trackers)
    except BaseException:
        trackers.finish(None)
        raise
    job_dir = local_copy(outcome.job_dir)  # for s3://, this host's copy of what was just committed
    trackers.finish(job_dir, {**outcome.task_metrics, **outcome.stats, **{
        name: outcome.metrics.get(name) for name in ("tokens_per_second", "train_seconds", "peak_memory_mb")}})
    JobStore(ctx.artifacts_root, ctx.batch_id, ctx.job_id).amend(job_dir)  # what the trackers added
    return outcome


def _build_train_save(ctx: JobContext, trackers) -> JobOutcome:
    from worker.data import read_labels
    from worker.device import DeviceManager
    from worker.evaluation import evaluate_sets
    from worker.extensions import ExtensionConfig, extension_class
    from worker.models import BASE_MODELS, base_family, classifier_model
    from worker.training import Trainer

    _freeze_startup_objects()
    spec, objective = resolve_objective_of(ctx.spec)
    job_dir = ctx.job_dir  # validates the ids before anything runs
    store = JobStore(ctx.artifacts_root, ctx.batch_id, ctx.job_id)
    store.check_access()  # a missing bucket or refused credentials fail the job before any training
    report = ctx.on_progress or (lambda progress: None)
    cancelled = ctx.should_cancel or (lambda: False)

    def check_cancel(where: str) -> None:
        if cancelled():
            raise JobCancelled(f"cancelled {where}")

    report(Progress(step=0, total_steps=0, phase="setup"))
    started = time.perf_counter()
    device_manager = DeviceManager(spec.device, spec.dtype, family=base_family(spec.base_model))
    device_manager.reset_peak_memory()
    base, from_cache = BASE_MODELS.get(spec.base_model, device_manager, objective, spec.quantize)
    seed = spec.train.seed if spec.train is not None else 0
    device_manager.seed(seed)
    labels = None
    base_model = base.model
    if objective == "classification":
        # A create job has no data: it counts the model with a two-label head.
        labels = read_labels(spec.train) if spec.train is not None else ["0", "1"]
        base_model = classifier_model(base, labels, seed)
    config = ExtensionConfig.from_job_spec(spec, _start_from(spec, ctx.needed_dirs))
    extension = extension_class(spec.extension)(base_model, config, device_manager)
    model = extension.build(spec.task)
    stats = extension.statistics(spec.task)
    refs = parent_refs(spec)
    started_from = {section: {"from": refs[section], **origin}
                    for section, origin in extension.origins.get(spec.task, {}).items()}
    setup_seconds = time.perf_counter() - started
    log.info("job %s: %s/%s set up in %.2fs (base model %s)", ctx.job_id, spec.extension, spec.task,
             setup_seconds, "cached" if from_cache else "loaded")
    check_cancel("before training")

    metrics: dict = {"train_loss": None, "eval_loss": None, "steps": 0, "tokens_per_second": None,
                     "train_seconds": None}
    task_metrics: dict[str, float] = {}
    samples: list[dict[str, str]] = []
    curve: list[tuple[int, str, float]] = []
    metric_curve: list[tuple[int, str, float]] = []
    eval_sets: dict[str, dict[str, float]] = {}
    resumed_from_step = 0
    resume_dir = ctx.resume_dir
    if spec.kind == JobKind.TRAIN:
        last_report = [0.0]

        def on_step(step: int, total: int, loss: float) -> None:
            now = time.monotonic()
            if now - last_report[0] >= ctx.progress_interval or step == total:
                last_report[0] = now
                report(Progress(step=step, total_steps=total, loss=loss))

        trainer = Trainer(model, base.tokenizer, objective, spec.train, device_manager,
                          on_step=on_step, should_cancel=cancelled,
                          checkpoint_dir=resume_dir if spec.train.checkpoint_every else None, labels=labels,
                          after_step=functools.partial(extension.after_step, spec.task),
                          on_log=trackers.log_metrics,
                          on_checkpoint=store.checkpoint_saved)
        try:
            if spec.train.checkpoint_every:
                store.restore_checkpoint(resume_dir)
            trainer.setup()
            if trainer.step:
                log.info("job %s: resuming from the checkpoint at step %d", ctx.job_id, trainer.step)
            result = trainer.train()
            task_metrics, samples = trainer.kept_results()
            eval_sets = evaluate_sets(trainer, spec.eval)
        finally:
            trainer.cleanup()
        metrics.update(train_loss=result.train_loss, eval_loss=result.eval_loss, steps=result.steps,
                       tokens_per_second=result.tokens_per_second, train_seconds=result.train_seconds,
                       micro_batch_size=spec.train.batch_size, **result.best)
        curve, resumed_from_step, metric_curve = result.curve, result.resumed_from, result.metric_curve
    metrics["peak_memory_mb"] = device_manager.peak_memory_mb()
    check_cancel("before saving")

    report(Progress(step=metrics["steps"], total_steps=metrics["steps"], phase="save"))
    versions = library_versions()
    model.eval()

    payload = {
        "job_id": ctx.job_id, "batch_id": ctx.batch_id, "spec": spec.to_json(), "stats": stats.as_dict(),
        "metrics": {**metrics, "resumed_from_step": resumed_from_step,
                    **({"effective_batch_size": spec.train.effective_batch_size} if spec.train else {})},
        "device": str(device_manager.device),
        "dtype": device_manager.dtype_name, "versions": versions, "task_metrics": task_metrics,
        "samples": samples, "eval_sets": eval_sets,
    }
    if labels is not None:
        payload["labels"] = labels
    if started_from:
        payload["started_from"] = started_from
    artifacts = write_atomically(job_dir, functools.partial(_write_artifacts, extension, spec, payload))
    location = store.publish(job_dir)
    shutil.rmtree(resume_dir, ignore_errors=True)
    store.discard_checkpoint()
    outcome = JobOutcome(
        stats=stats.as_dict(), metrics=metrics, device=str(device_manager.device),
        dtype=device_manager.dtype_name, versions=versions, job_dir=str(location),
        adapter_path=str(location / artifacts["adapter"]) if "adapter" in artifacts else None,
        layer_path=str(location / artifacts["layer"]) if "layer" in artifacts else None,
        loss_curve=curve, setup_seconds=setup_seconds, task_metrics=task_metrics,
        samples=samples or None, metric_curve=metric_curve, eval_sets=eval_sets,
    )
    # Drop this job's model before freeing memory, so nothing leaks into the next job.
    del model, extension, base_model
    device_manager.release()
    return outcome


def _write_artifacts(extension, spec: JobSpec, payload: dict, directory: Path) -> dict[str, Path]:
    """Save the task's artifacts and job.json in `directory`; return {role: path relative to it}.
    A classifier's head that no PEFT adapter holds (a layer job's) is saved under `head/`."""
    saved = {**extension.save(spec.task, directory), **extension.save_head(spec.task, directory)}
    write_job_json(directory, payload)
    return {role: Path(path).relative_to(directory) for role, path in saved.items()}


def load_job_model(job_dir: str | Path, device: str = "cpu", dtype: str = "auto"):
    """Rebuild a trained model from a job directory: (model in eval mode, tokenizer, job.json dict).

    The job's extension kind loads what its `save` wrote. `dtype` is the base's (see the `dtype`
    job key); added blocks take it too, so that the model runs (forward, generate) without autocast.
    """
    from worker.artifacts import read_job_json
    from worker.device import DeviceManager
    from worker.extensions import ExtensionConfig, extension_class
    from worker.models import base_family, classification_head, classifier_model, load_base_model

    job_dir = local_copy(job_dir)
    info = read_job_json(job_dir)
    spec, objective = resolve_objective_of(JobSpec.model_validate(info["spec"]))
    device_manager = DeviceManager(device, dtype, family=base_family(spec.base_model))
    # a QLoRA job's adapter also applies to the unquantised base, which is all a CPU can load
    base = load_base_model(spec.base_model, device_manager, objective,
                           spec.quantize if device_manager.device.type == "cuda" else None)
    base_model = base.model
    if objective == "classification":
        seed = spec.train.seed if spec.train is not None else 0
        base_model = classifier_model(base, info.get("labels") or ["0", "1"], seed)
    extension = extension_class(spec.extension)(base_model, ExtensionConfig.from_job_spec(spec), device_manager)
    model = extension.load(spec.task, job_dir)
    extension.load_head(model, job_dir)
    head = classification_head(model)
    for block in [*extension.new_blocks[spec.task], *([head] if head is not None else [])]:
        device_manager.place_base(block)
    model.eval()
    return model, base.tokenizer, info
