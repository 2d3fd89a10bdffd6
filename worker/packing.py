"""Packed training: several LoRA jobs on one frozen base model, trained together in one process.

    run_pack([ctx1, ctx2, ...], on_done)   # on_done(index, JobOutcome | BaseException), once per job

Every job gets its own adapter (PEFT's named adapters on one shared model), optimizer, learning
rate schedule, seed, data order, dropout stream, step count, checkpoints and outcome. Each round
takes the next micro-batch of every job still training, concatenates them along the batch and runs
the frozen base once; each target Linear adds a job's LoRA update to that job's rows only (a
`_Route` says which rows and, per sequence stream, how long that job's own batch is). The loss is
each job's own mean over its own target tokens, so a job's gradients, optimizer steps and saved
adapter are those it would get trained alone, up to float rounding (the concatenated batch is
padded on the right; padded positions are masked out or come after every real token).

A job leaves the pack when it finishes, fails, is cancelled or is interrupted; the others go on.
A base model with active dropout cannot share one forward pass between jobs with exact per-job
dropout, so its jobs' forward passes run one after another (each with its own random stream).

What may be packed is `pack_key`: equal keys, same pack.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.spec import JobKind, JobSpec
from worker.errors import JobCancelled, JobError, JobInterrupted

log = logging.getLogger(__name__)

#: the objectives a pack can train: one loss per job from the logits (no per-job classifier head)
PACKABLE_OBJECTIVES = ("seq2seq", "causal")


def pack_key(spec: JobSpec) -> tuple | None:
    """What jobs packed together must share; None for a job that always trains alone.

    Packable: a `train` job of extension `lora` with a plain adapter (variant `lora`, init
    `default` or `gaussian`, no `lora.from`), no quantization, no gradient checkpointing, no
    LoRA+, dtype not float16 (its loss scaler is per model). Jobs pack together when they
    share the base model, objective, device, dtype and max_length; r, alpha, dropout,
    target_modules, data, optimizer, learning rate, schedule, batch size, steps and seed are per job.
    """
    train = spec.train
    if spec.kind != JobKind.TRAIN or spec.extension != "lora" or train is None:
        return None
    lora = spec.lora
    if lora is not None and (lora.variant != "lora" or lora.init not in ("default", "gaussian")
                             or lora.from_ is not None):
        return None
    if spec.quantize or train.gradient_checkpointing or train.loraplus_lr_ratio is not None:
        return None
    if spec.dtype == "float16" or (getattr(spec, "gpus", None) or 1) > 1:
        return None
    if train.objective is not None and train.objective not in PACKABLE_OBJECTIVES:
        return None
    return (spec.base_model, train.objective, spec.device, spec.dtype, train.max_length)


# --- routing: which rows of the concatenated batch each adapter updates ------------------------


@dataclass
class _Segment:
    start: int
    end: int
    adapter: str
    #: the pack's padded length of each sequence stream -> this job's own padded length
    lengths: dict[int, int]
    member: _Member


@dataclass
class _Route:
    #: one adapter on every row (evaluation, generation, a pack of one); None while packed
    solo: str | None = None
    segments: list[_Segment] = field(default_factory=list)


class _Router:
    """Replaces the forward of every LoRA Linear in the model with one that follows `route`."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import Linear as LoraLinear

        self.route = _Route()
        self.layers = []
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.forward = functools.partial(self._forward, module)
                self.layers.append(module)

    @contextmanager
    def solo(self, adapter: str):
        previous, self.route = self.route, _Route(solo=adapter)
        try:
            yield
        finally:
            self.route = previous

    @contextmanager
    def packed(self, segments: list[_Segment]):
        previous, self.route = self.route, _Route(segments=segments)
        try:
            yield
        finally:
            self.route = previous

    def _forward(self, layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        route = self.route
        if route.solo is not None:
            if route.solo not in layer.lora_A:
                return result
            return (result + _delta(layer, route.solo, x)).to(result.dtype)
        if not route.segments:
            return result
        parts = []
        for segment in route.segments:
            rows = result[segment.start:segment.end]
            if segment.adapter not in layer.lora_A:
                parts.append(rows)
                continue
            inputs = x[segment.start:segment.end]
            if x.dim() == 3:
                try:
                    length = segment.lengths[x.shape[1]]
                except KeyError:
                    raise RuntimeError(f"packed LoRA layer got a sequence of length {x.shape[1]}, not one of the "
                                       f"pack's ({sorted(segment.lengths)})") from None
                inputs = inputs[:, :length]
                delta = _delta(layer, segment.adapter, inputs, segment.member)
                own = rows[:, :length] + delta
                parts.append(torch.cat([own, rows[:, length:].to(own.dtype)], dim=1).to(result.dtype))
            else:
                parts.append((rows + _delta(layer, segment.adapter, inputs, segment.member)).to(result.dtype))
        return torch.cat(parts, dim=0)


def _delta(layer, adapter: str, x: torch.Tensor, member: _Member | None = None) -> torch.Tensor:
    """The adapter's update for `x`, as PEFT's LoRA Linear computes it; dropout draws from the
    member's own random stream."""
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    dropout = layer.lora_dropout[adapter]
    x = x.to(lora_a.weight.dtype)
    if member is not None and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
        with member.random_stream():
            x = dropout(x)
    else:
        x = dropout(x)
    return lora_b(lora_a(x)) * layer.scaling[adapter]


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether the base model drops anything in training (its own dropout, not the adapters')."""
    for name, module in model.named_modules():
        if ".lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    return any(float(getattr(config, key, 0.0) or 0.0) > 0 for key in ("attention_dropout", "attn_pdrop"))


# --- one job of the pack ------------------------------------------------------------------------


@dataclass
class _Member:
    index: int
    ctx: Any  # worker.pipeline.JobContext
    spec: JobSpec
    adapter: str
    trainer: Any = None
    stats: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    device: torch.device | None = None
    #: the current optimizer step's collated micro-batches, their target counts, the next one's index
    batches: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    position: int = 0
    step_loss: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    initial_eval: float | None = None
    last_loss: float | None = None
    last_report: float = 0.0

    def capture_random(self) -> None:
        self.rng = {"cpu": torch.get_rng_state(), "python": random.getstate()}
        if self.device is not None and self.device.type == "cuda":
            self.rng["cuda"] = torch.cuda.get_rng_state(self.device)

    @contextmanager
    def random_stream(self):
        """Run with this job's random state as the global one (the job alone would use the global one)."""
        saved = {"cpu": torch.get_rng_state(), "python": random.getstate()}
        cuda = self.device is not None and self.device.type == "cuda"
        if cuda:
            saved["cuda"] = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.rng["cuda"], self.device)
        torch.set_rng_state(self.rng["cpu"])
        random.setstate(self.rng["python"])
        try:
            yield
        finally:
            self.capture_random()
            torch.set_rng_state(saved["cpu"])
            random.setstate(saved["python"])
            if cuda:
                torch.cuda.set_rng_state(saved["cuda"], self.device)


def _member_trainer_class():
    from worker.training import Trainer

    class MemberTrainer(Trainer):
        """A Trainer over the pack's shared model that names its parameters as the job alone would,
        so that a checkpoint resumes packed or alone alike."""

        pack_adapter = ""
        alone_adapter = ""

        def _trainable_names(self) -> dict[int, str]:
            mine = f".{self.pack_adapter}."
            return {id(p): n.replace(mine, f".{self.alone_adapter}.") for n, p in self.model.named_parameters()
                    if p.requires_grad and mine in n}

    return MemberTrainer


# --- the pack -------------------------------------------------------------------------------------


def run_pack(contexts: Sequence[Any], on_done: Callable[[int, Any], None]) -> None:
    """Train the jobs of `contexts` (worker.pipeline.JobContext, equal `pack_key`) together.

    `on_done(index, outcome)` is called once per job as it leaves the pack, with its JobOutcome or the
    exception that ended it (JobError, JobCancelled, JobInterrupted, or any other); the rest go on.
    """
    from worker import pipeline

    done: set[int] = set()

    def finish(member_index: int, outcome: Any) -> None:
        if member_index not in done:
            done.add(member_index)
            on_done(member_index, outcome)

    try:
        _run_pack(list(contexts), finish)
    except BaseException as error:
        for index in range(len(contexts)):
            finish(index, error)
        pipeline._clear_frames(error)
        from worker.device import release_memory

        release_memory()
        if not isinstance(error, Exception):
            raise


def _run_pack(contexts: list[Any], finish: Callable[[int, Any], None]) -> None:
    from worker.architectures import architecture_for
    from worker.device import DeviceManager
    from worker.extensions.lora import adapter_name_for
    from worker.extensions.peft_methods import add_adapter
    from worker.models import BASE_MODELS, base_family, structural_copy
    from worker.pipeline import Progress, _freeze_startup_objects, resolve_objective_of
    from worker.stats import adapter_parameters, count_params, param_stats

    _freeze_startup_objects()
    resolved = []
    for index, ctx in enumerate(contexts):
        try:
            spec, objective = resolve_objective_of(ctx.spec)
            if objective not in PACKABLE_OBJECTIVES:
                raise JobError(f"job {ctx.job_id}: objective {objective} cannot be packed")
            _ = ctx.job_dir  # validates the ids
            resolved.append((index, ctx, spec, objective))
            if ctx.on_progress:
                ctx.on_progress(Progress(step=0, total_steps=0, phase="setup"))
        except Exception as error:
            finish(index, error)
    if not resolved:
        return
    first = resolved[0][2]
    objective = resolved[0][3]
    device_manager = DeviceManager(first.device, first.dtype, family=base_family(first.base_model))
    device_manager.reset_peak_memory()
    started = time.perf_counter()
    base, _ = BASE_MODELS.get(first.base_model, device_manager, objective, None)
    base_model = base.model
    base_model.requires_grad_(False)
    arch = architecture_for(base_model)
    base_params = count_params(base_model.parameters())
    MemberTrainer = _member_trainer_class()

    model: Any = structural_copy(base_model)
    members: list[_Member] = []
    for index, ctx, spec, _objective in resolved:
        name = f"graftq_pack_{index}"
        try:
            device_manager.seed(spec.train.seed)
            from jobs.spec import LoRASpec

            model = add_adapter(model, "lora", spec.lora or LoRASpec(), arch, name)
            member = _Member(index=index, ctx=ctx, spec=spec, adapter=name, device=device_manager.device)
            params = adapter_parameters(model, name)
            for p in params:
                p.requires_grad_(True)
            member.stats = param_stats(model, base_params, {"lora": params}).as_dict()
            trainer = MemberTrainer(model, base.tokenizer, objective, spec.train, device_manager, labels=None)
            trainer.pack_adapter, trainer.alone_adapter = name, adapter_name_for(spec.task)
            trainer.setup()
            trainer.params = [p for n, p in model.named_parameters() if f".{name}." in n]
            trainer.optimizer = trainer._make_optimizer()
            trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, trainer.lr_factor)
            trainer.should_cancel = ctx.should_cancel or (lambda: False)
            if spec.train.checkpoint_every:
                trainer.checkpoint_dir = ctx.resume_dir
                if (ctx.resume_dir / "trainer_state.json").exists():
                    trainer._load_checkpoint()
                    log.info("job %s: resuming from the checkpoint at step %d", ctx.job_id, trainer.step)
            member.trainer = trainer
            member.resumed_from = trainer.step
            member.capture_random()
            members.append(member)
        except Exception as error:
            finish(index, error)
    if not members:
        return
    for member in members:  # PEFT's set_adapter left only the last adapter trainable
        for p in member.trainer.params:
            p.requires_grad_(True)
    model.train()
    router = _Router(model)
    serial = has_active_dropout(base_model)
    setup_seconds = time.perf_counter() - started
    log.info("pack of %d job(s) on %s set up in %.2fs%s", len(members), first.base_model, setup_seconds,
             " (the base has dropout: one forward pass per job)" if serial else "")

    def leave(member: _Member, outcome: Any) -> None:
        members.remove(member)
        if member.trainer is not None:
            member.trainer.cleanup()
        finish(member.index, outcome)

    for member in list(members):
        try:
            if member.resumed_from == 0:
                with router.solo(member.adapter):
                    member.initial_eval = member.trainer.evaluate()
                if member.initial_eval is not None:
                    member.trainer.curve.append((0, "eval", member.initial_eval))
            model.train()
        except Exception as error:
            leave(member, error)

    while members:
        # stop checks and the next micro-batch of every job still training
        for member in list(members):
            trainer = member.trainer
            try:
                if trainer.step >= trainer.total_steps:
                    leave(member, _finish_member(member, router, model, device_manager, setup_seconds))
                    continue
                if member.position == 0:
                    if trainer._stop_requested():
                        raise JobCancelled(f"cancelled at step {trainer.step}")
                    examples = trainer.micro_batches(trainer.step)
                    from worker.data import collate

                    member.batches = [collate(e, objective, trainer.pad_id) for e in examples]
                    member.counts = [trainer._label_tokens(b) for b in member.batches]
                    member.tokens += sum(trainer._tokens(e) for e in examples)
                    member.step_loss = 0.0
            except Exception as error:
                leave(member, error)
        if not members:
            break
        round_started = time.perf_counter()
        try:
            if serial or len(members) == 1:
                for member in members:
                    with member.random_stream(), router.solo(member.adapter):
                        losses = _losses(model, [member], objective, device_manager, packed=False)
                        _backward(losses, [member])
            else:
                with router.packed(_segments(members, objective)):
                    losses = _losses(model, members, objective, device_manager, packed=True)
                    _backward(losses, members)
        except torch.OutOfMemoryError:
            raise JobError(f"out of memory on {device_manager.device} training a pack of {len(members)} jobs; "
                           "run the worker with a smaller --pack") from None
        took = (time.perf_counter() - round_started) / max(1, len(members))
        for member in list(members):
            member.seconds += took
            member.position += 1
            if member.position < len(member.batches):
                continue
            member.position = 0
            try:
                _optimizer_step(member)
            except Exception as error:
                leave(member, error)


def _segments(members: list[_Member], objective: str) -> list[_Segment]:
    widths = [b["input_ids"].shape[1] for m in members for b in [m.batches[m.position]]]
    width = max(widths)
    label_width = max(m.batches[m.position]["labels"].shape[1] for m in members)
    if objective == "seq2seq" and label_width == width:
        label_width += 1  # the streams' lengths tell a Linear's input stream: keep them apart
    segments, start = [], 0
    for member in members:
        batch = member.batches[member.position]
        rows = batch["input_ids"].shape[0]
        lengths = {width: batch["input_ids"].shape[1]}
        if objective == "seq2seq":
            lengths[label_width] = batch["labels"].shape[1]
        segments.append(_Segment(start, start + rows, member.adapter, lengths, member))
        start += rows
    return segments


def _pad(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _losses(model, members: list[_Member], objective: str, dm, *, packed: bool) -> list[torch.Tensor]:
    """Each member's mean loss over its own target tokens, from one forward pass over their batches."""
    from worker.data import IGNORE_INDEX

    batches = [m.batches[m.position] for m in members]
    width = max(b["input_ids"].shape[1] for b in batches)
    label_width = max(b["labels"].shape[1] for b in batches)
    if packed and objective == "seq2seq" and label_width == width and len(members) > 1:
        label_width += 1  # as in _segments
    pad_id = members[0].trainer.pad_id
    input_ids = torch.cat([_pad(b["input_ids"], width, pad_id) for b in batches]).to(dm.device)
    attention = torch.cat([_pad(b["attention_mask"], width, 0) for b in batches]).to(dm.device)
    labels = torch.cat([_pad(b["labels"], label_width if objective == "seq2seq" else width, IGNORE_INDEX)
                        for b in batches]).to(dm.device)
    with dm.autocast():
        if objective == "seq2seq":
            inner = model.get_base_model()
            decoder_inputs = inner.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = model(input_ids=input_ids, attention_mask=attention, decoder_input_ids=decoder_inputs,
                           use_cache=False).logits
        else:
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    losses, start = [], 0
    for batch in batches:
        rows, length = batch["input_ids"].shape[0], batch["input_ids"].shape[1]
        own_labels = batch["labels"].to(dm.device)
        if objective == "seq2seq":
            own = logits[start:start + rows, :own_labels.shape[1]]
            loss = torch.nn.functional.cross_entropy(own.reshape(-1, own.shape[-1]), own_labels.reshape(-1),
                                                     ignore_index=IGNORE_INDEX)
        else:
            own = logits[start:start + rows, :length].float()
            shifted = torch.nn.functional.pad(own_labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            loss = torch.nn.functional.cross_entropy(own.reshape(-1, own.shape[-1]), shifted.reshape(-1),
                                                     ignore_index=IGNORE_INDEX)
        losses.append(loss)
        start += rows
    return losses


def _backward(losses: list[torch.Tensor], members: list[_Member]) -> None:
    """One backward over the members' losses, each weighted by its micro-batch's share of the step's
    target tokens (the Trainer's accumulation); the adapters share no parameter, so each gets its own."""
    total = None
    for loss, member in zip(losses, members):
        if len(member.batches) > 1:
            loss = loss * (member.counts[member.position] / max(sum(member.counts), 1))
        member.step_loss += float(loss.detach())
        total = loss if total is None else total + loss
    total.backward()


def _optimizer_step(member: _Member) -> None:
    """The member's optimizer step after its last micro-batch, as Trainer._train_step does it."""
    trainer = member.trainer
    value = member.step_loss
    if not math.isfinite(value):
        trainer.optimizer.zero_grad(set_to_none=True)
        raise JobError(trainer._non_finite("training loss", value, f"at step {trainer.step + 1}"))
    if trainer.spec.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainer.params, trainer.spec.max_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    member.last_loss = value
    trainer.curve.append((trainer.step, "train", value))
    trainer.dm.sample_memory()
    report = member.ctx.on_progress
    now = time.monotonic()
    if report is not None and (now - member.last_report >= member.ctx.progress_interval
                               or trainer.step == trainer.total_steps):
        from worker.pipeline import Progress

        member.last_report = now
        report(Progress(step=trainer.step, total_steps=trainer.total_steps, loss=value))
    if (trainer.checkpoint_dir is not None and trainer.spec.checkpoint_every
            and trainer.step % trainer.spec.checkpoint_every == 0 and trainer.step < trainer.total_steps):
        trainer.save_checkpoint()


def _finish_member(member: _Member, router: _Router, model, device_manager, setup_seconds: float):
    """Final evaluation, task metrics and artifacts of a member whose training is done: its JobOutcome."""
    from worker.artifacts import write_atomically, write_job_json
    from worker.extensions.lora import save_adapter
    from worker.pipeline import JobOutcome, Progress, library_versions

    trainer, ctx, spec = member.trainer, member.ctx, member.spec
    with router.solo(member.adapter):
        final_eval = trainer.evaluate()
        if final_eval is not None:
            trainer.curve.append((trainer.step, "eval", final_eval))
        task_metrics = trainer.task_metrics()
    model.train()
    if ctx.should_cancel is not None and ctx.should_cancel():
        raise JobCancelled("cancelled before saving")
    metrics = {"train_loss": member.last_loss, "eval_loss": final_eval, "steps": trainer.step,
               "tokens_per_second": member.tokens / member.seconds if member.seconds > 0 else 0.0,
               "train_seconds": member.seconds, "peak_memory_mb": device_manager.peak_memory_mb()}
    if ctx.on_progress:
        ctx.on_progress(Progress(step=trainer.step, total_steps=trainer.step, phase="save"))
    versions = library_versions()
    samples = trainer.samples
    payload = {
        "job_id": ctx.job_id, "batch_id": ctx.batch_id, "spec": spec.to_json(), "stats": member.stats,
        "metrics": {**metrics, "resumed_from_step": member.resumed_from,
                    "effective_batch_size": spec.train.effective_batch_size},
        "device": str(device_manager.device), "dtype": device_manager.dtype_name, "versions": versions,
        "task_metrics": task_metrics, "samples": samples,
    }

    def write(directory):
        adapter = save_adapter(model, directory / "adapter", adapter_name=member.adapter)
        write_job_json(directory, payload)
        return adapter.relative_to(directory)

    adapter = write_atomically(ctx.job_dir, write)
    shutil.rmtree(ctx.resume_dir, ignore_errors=True)
    return JobOutcome(
        stats=member.stats, metrics=metrics, device=str(device_manager.device), dtype=device_manager.dtype_name,
        versions=versions, job_dir=str(ctx.job_dir), adapter_path=str(ctx.job_dir / adapter),
        loss_curve=list(trainer.curve), setup_seconds=setup_seconds, task_metrics=task_metrics,
        samples=samples or None,
    )


__all__ = ["JobInterrupted", "pack_key", "run_pack"]


# --- the worker's side: claim the pack, one claim, heartbeat and outcome per job ------------------

#: the environment variable `graftq worker --pack K` / `graftq run --pack K` sets for the task
PACK_ENV = "GRAFTQ_PACK"
#: queued jobs looked at for a pack (the compatible ones among them are claimed)
CANDIDATES = 200


def pack_size() -> int:
    """Jobs per pack for this process (`--pack`): 1 (no packing) unless GRAFTQ_PACK says more."""
    import os

    try:
        return max(1, int(os.environ.get(PACK_ENV) or 1))
    except ValueError:
        log.warning("%s=%r is not a whole number; jobs run alone", PACK_ENV, os.environ.get(PACK_ENV))
        return 1


def execute_pack(lead: Any, spec: JobSpec, settings: Any, *, eager: bool, size: int) -> str | None:
    """Claim up to `size - 1` queued jobs compatible with the claimed `lead` (a worker.tasks._Claimed)
    and train them all together; returns the lead's final status, or None (nothing was claimed:
    the caller runs the lead alone). Each job's outcome is recorded, fenced by its own claim, as it
    leaves the pack, with `packed_with` naming the others.
    """
    from sqlalchemy.exc import OperationalError

    from worker import pipeline, tasks
    from worker.errors import TransientError

    key = pack_key(spec)
    if key is None:
        return None
    extras = _claim_extras(lead, key, settings, size - 1)
    if not extras:
        return None
    members = [(lead, spec), *extras]
    ids = [job.job_id for job, _ in members]
    log.info("job %s: packed with %s", lead.job_id, " ".join(ids[1:]))
    beats, contexts = [], []
    for job, job_spec in members:
        beat = tasks._Heartbeat(job.database, job.job_id, job.claim.token, settings.heartbeat_interval)
        beat.start()
        progress = tasks._ProgressWriter(job.database, job.job_id, job.claim.token, beat)
        handing_back = not eager and job.claim.queue is not None
        beats.append(beat)
        contexts.append(pipeline.JobContext(
            job_id=job.job_id, batch_id=job.claim.batch_id, spec=job_spec, artifacts_root=settings.artifacts_dir,
            on_progress=progress, should_cancel=functools.partial(_should_stop, beat, progress, handing_back),
        ))
    statuses: dict[int, str] = {}
    retries: list[BaseException] = []

    def on_done(index: int, outcome: Any) -> None:
        job, beat, ctx = members[index][0], beats[index], contexts[index]
        beat.stop()
        try:
            if isinstance(outcome, pipeline.JobOutcome):
                statuses[index] = tasks._record_success(job, outcome, packed_with=[i for i in ids if i != job.job_id])
            elif isinstance(outcome, JobInterrupted):
                statuses[index] = tasks._hand_back(job, ctx.resume_dir)
            elif isinstance(outcome, JobCancelled):
                statuses[index] = tasks._record_cancel(job, claim_lost=beat.claim_lost)
            elif isinstance(outcome, (TransientError, OperationalError)):
                try:
                    statuses[index] = tasks._record_retry(job, outcome)
                except tasks._Retry as retry:
                    statuses[index] = "retrying"
                    if index == 0:
                        retries.append(retry)  # the lead's own message is retried by Celery
                    else:
                        _publish_again(job)
            elif isinstance(outcome, Exception):
                statuses[index] = tasks._record_failure(job, outcome)
        except Exception as error:  # not recorded: the claim goes stale and the reaper recovers the job
            log.error("job %s: the outcome of its packed run was not recorded: %s", job.job_id, error)

    try:
        run_pack(contexts, on_done)
    finally:
        for beat in beats:
            beat.stop()
    if retries:
        raise retries[0]
    return statuses.get(0, "skipped")


def _should_stop(beat: Any, progress: Any, handing_back: bool) -> bool:
    from worker.tasks import shutting_down

    if beat.cancel_requested or beat.claim_lost:
        return True
    if handing_back and shutting_down.is_set() and not progress.training_done:
        raise JobInterrupted("the worker is shutting down")
    return False


def _claim_extras(lead: Any, key: tuple, settings: Any, wanted: int) -> list[tuple[Any, JobSpec]]:
    """Claim up to `wanted` queued jobs whose spec has `key`: [(worker.tasks._Claimed, spec)]."""
    from pydantic import ValidationError

    from db.claims import claim_job, pack_candidates
    from worker import tasks

    database = lead.database

    def candidates() -> list[tuple[str, dict]]:
        with database.read() as connection:
            return pack_candidates(connection, lead.job_id, lead.claim.queue, lead.claim.batch_id, CANDIDATES)

    claimed: list[tuple[Any, JobSpec]] = []
    worker = lead.worker or "graftq-pack"
    for job_id, raw in tasks._with_db_retries(candidates):
        if len(claimed) >= wanted:
            break
        try:
            spec = JobSpec.model_validate(raw)
        except ValidationError:
            continue  # claimed alone, its own run records why it is not valid
        if pack_key(spec) != key:
            continue

        def claim(job_id: str = job_id):
            with database.begin() as connection:
                return claim_job(connection, job_id, worker, settings.stale_after)

        try:
            claim_ = tasks._with_db_retries(claim)
        except Exception as error:  # the pack goes on with the jobs it has
            log.warning("job %s: not packed (%s)", job_id, error)
            continue
        if claim_ is not None:
            claimed.append((tasks._Claimed(database, job_id, claim_), spec))
    return claimed


def _publish_again(job: Any) -> None:
    """Publish a job given back to the queue (its earlier message was consumed); the reaper publishes
    it when this fails."""
    from worker import tasks

    if job.claim.queue is None:
        return
    from jobs.submit import publish_jobs

    try:
        sent = publish_jobs(tasks.app, [job.job_id], [job.claim.queue])
        tasks._with_db_retries(lambda: tasks._mark_published(job.database, sent))
    except Exception as error:
        log.warning("job %s: not published again (%s); the reaper will publish it", job.job_id, error)
