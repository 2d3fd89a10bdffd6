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

What may be packed is `worker.pack_worker.pack_key`: equal keys, same pack.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.spec import JobSpec
from worker.errors import JobCancelled, JobError, JobInterrupted
from worker.pack_worker import PACKABLE_OBJECTIVES, pack_key

log = logging.getLogger(__name__)

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
    #: the segments' (adapter, rows): what a layer's `_Plan` depends on
    layout: tuple = ()


@dataclass
class _Plan:
    """What `_packed_delta` needs of one LoRA layer for one layout of the batch, built once: the
    adapters' weights (the pack's own Parameters, updated in place by the optimizers), the dropout
    keep-probability of each segment (None: no dropout), and the row gate."""

    a: list
    b: list
    keeps: list
    #: None: no adapter of the pack is on this layer
    gate: torch.Tensor | None


class _Router:
    """Replaces the forward of every LoRA Linear in the model with one that follows `route`."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import Linear as LoraLinear

        self.route = _Route()
        #: (layer id, input rank, layout, training) -> _Plan, kept while the pack lives
        self.plans: dict[tuple, _Plan] = {}
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.forward = functools.partial(self._forward, module)

    @contextmanager
    def solo(self, adapter: str):
        previous, self.route = self.route, _Route(solo=adapter)
        try:
            yield
        finally:
            self.route = previous

    @contextmanager
    def packed(self, segments: list[_Segment]):
        layout = tuple((segment.adapter, segment.end - segment.start) for segment in segments)
        previous, self.route = self.route, _Route(segments=segments, layout=layout)
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
        key = (id(layer), x.dim(), route.layout, layer.training)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = _plan(layer, x, route.segments)
        if plan.gate is None:  # no adapter of the pack on this layer
            return result
        return (result + _packed_delta(x, route.segments, plan)).to(result.dtype)


def _plan(layer, x: torch.Tensor, segments: list[_Segment]) -> _Plan:
    present = [segment for segment in segments if segment.adapter in layer.lora_A]
    keeps = []
    for segment in segments:
        dropout = layer.lora_dropout[segment.adapter] if segment.adapter in layer.lora_A else None
        active = isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training
        keeps.append(1 - dropout.p if active else None)
    if not present:
        return _Plan([], [], keeps, None)
    weight = layer.lora_A[present[0].adapter].weight
    rows_gate = []
    for segment in segments:
        row: list[float] = []
        for other in present:
            rank = layer.lora_A[other.adapter].weight.shape[0]
            row += [float(layer.scaling[other.adapter]) if other is segment else 0.0] * rank
        rows_gate += [row] * (segment.end - segment.start)
    gate = torch.tensor(rows_gate, dtype=weight.dtype, device=x.device)
    if x.dim() == 3:
        gate = gate.unsqueeze(1)
    return _Plan(a=[layer.lora_A[segment.adapter].weight for segment in present],
                 b=[layer.lora_B[segment.adapter].weight for segment in present], keeps=keeps, gate=gate)


def _packed_delta(x: torch.Tensor, segments: list[_Segment], plan: _Plan) -> torch.Tensor:
    """Every job's update on its own rows in two matmuls: x times all adapters' A (concatenated),
    a gate that keeps each row's own adapter block (times its scaling) and zeroes the others,
    times all adapters' B. Dropout masks are drawn per job, in the job's own shape."""
    inputs = x.to(plan.a[0].dtype)
    if any(keep is not None for keep in plan.keeps):
        masks = []
        for segment, keep in zip(segments, plan.keeps, strict=True):
            shape = [segment.end - segment.start, *x.shape[1:]]
            if keep is None:
                masks.append(torch.ones(shape, dtype=inputs.dtype, device=x.device))
                continue
            if x.dim() == 3:
                try:
                    shape[1] = segment.lengths[x.shape[1]]
                except KeyError:
                    raise RuntimeError(f"packed LoRA layer got a sequence of length {x.shape[1]}, not one of the "
                                       f"pack's ({sorted(segment.lengths)})") from None
            # what torch's dropout draws for the job alone, from the job's own generator
            mask = torch.empty(shape, dtype=inputs.dtype, device=x.device).bernoulli_(
                keep, generator=segment.member.generator).div_(keep)
            if x.dim() == 3 and shape[1] != x.shape[1]:
                mask = torch.nn.functional.pad(mask, (0, 0, 0, x.shape[1] - shape[1]))
            masks.append(mask)
        inputs = inputs * torch.cat(masks)
    a = torch.cat(plan.a) if len(plan.a) > 1 else plan.a[0]
    b = torch.cat(plan.b, dim=1) if len(plan.b) > 1 else plan.b[0]
    return torch.nn.functional.linear(torch.nn.functional.linear(inputs, a) * plan.gate, b)


def _delta(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter's update for `x`, as PEFT's LoRA Linear computes it (a lone job's dropout draws
    from the global stream, which `_Member.random_stream` makes the job's own in training)."""
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    x = layer.lora_dropout[adapter](x.to(lora_a.weight.dtype))
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
    generator: Any = None
    device: torch.device | None = None
    #: the current optimizer step's collated micro-batches, their target counts, the next one's index
    batches: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    position: int = 0
    step_loss: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    last_loss: float | None = None
    last_report: float = 0.0

    def capture_random(self) -> None:
        """Start the job's random stream where the global one is now (after its own seeding and set-up)."""
        cuda = self.device is not None and self.device.type == "cuda"
        self.generator = torch.Generator(device=self.device if cuda else "cpu")
        self.generator.set_state(torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state())

    @contextmanager
    def random_stream(self):
        """Run with this job's random stream as the global one (the job alone would use the global one)."""
        cuda = self.device is not None and self.device.type == "cuda"
        get = functools.partial(torch.cuda.get_rng_state, self.device) if cuda else torch.get_rng_state
        put = functools.partial(torch.cuda.set_rng_state, device=self.device) if cuda else torch.set_rng_state
        saved = get()
        put(self.generator.get_state())
        try:
            yield
        finally:
            self.generator.set_state(get())
            put(saved)


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


@dataclass
class _Pack:
    """The shared model of a pack, with its router and its members' trainers."""

    model: Any
    router: _Router
    members: list[_Member]
    objective: str
    device_manager: Any
    #: the base has dropout: the members' forward passes run one after another in training
    serial: bool
    setup_seconds: float


def _set_up(contexts: list[Any], finish: Callable[[int, Any], None]) -> _Pack | None:
    """One base model with an adapter and a Trainer per job (resumed from its checkpoint if it has
    one); a job that cannot be set up leaves through `finish`. None when none could be."""
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
        return None
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
        return None
    for member in members:  # PEFT's set_adapter left only the last adapter trainable
        for p in member.trainer.params:
            p.requires_grad_(True)
    model.train()
    router = _Router(model)
    serial = has_active_dropout(base_model)
    setup_seconds = time.perf_counter() - started
    log.info("pack of %d job(s) on %s set up in %.2fs%s", len(members), first.base_model, setup_seconds,
             " (the base has dropout: one forward pass per job)" if serial else "")
    return _Pack(model, router, members, objective, device_manager, serial, setup_seconds)


def _run_pack(contexts: list[Any], finish: Callable[[int, Any], None]) -> None:
    pack = _set_up(contexts, finish)
    if pack is None:
        return
    model, router, members, objective = pack.model, pack.router, pack.members, pack.objective
    device_manager, serial, setup_seconds = pack.device_manager, pack.serial, pack.setup_seconds

    def leave(member: _Member, outcome: Any) -> None:
        members.remove(member)
        if member.trainer is not None:
            member.trainer.cleanup()
        finish(member.index, outcome)

    starting = [member for member in members if member.resumed_from == 0]
    for member, result in zip(starting, _evaluate_together(starting, router, model, objective, device_manager),
                              strict=True):
        if isinstance(result, BaseException):
            leave(member, result)
        elif result is not None:
            member.trainer.curve.append((0, "eval", result))

    while members:
        finishing = [member for member in members if member.trainer.step >= member.trainer.total_steps]
        if finishing:  # evaluated and generated from together, then saved one by one
            outcomes = _finish_members(finishing, router, model, objective, device_manager, setup_seconds)
            for member, outcome in zip(finishing, outcomes, strict=True):
                leave(member, outcome)
            continue
        # stop checks and the next micro-batch of every job still training
        for member in list(members):
            trainer = member.trainer
            try:
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
                        losses = _losses(model, [member.batches[member.position]], objective, device_manager,
                                         member.trainer.pad_id, packed=False)
                        _backward(losses, [member])
            else:
                parts = [(member, member.batches[member.position]) for member in members]
                _backward(_run_losses(parts, router, model, objective, device_manager), members)
        except torch.OutOfMemoryError:
            raise _out_of_memory("training", len(members), device_manager) from None
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


def _out_of_memory(doing: str, count: int, dm) -> JobError:
    return JobError(f"out of memory on {dm.device} {doing} a pack of {count} jobs; run the worker with a smaller "
                    "--pack")


def _segments(parts: list[tuple[_Member, dict]], objective: str) -> list[_Segment]:
    """The rows of each (member, collated batch) in the batches' concatenation, in order."""
    width = max(batch["input_ids"].shape[1] for _, batch in parts)
    label_width = max(batch["labels"].shape[1] for _, batch in parts)
    if objective == "seq2seq" and label_width == width:
        label_width += 1  # the streams' lengths tell a Linear's input stream: keep them apart
    segments, start = [], 0
    for member, batch in parts:
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


def _losses(model, batches: list[dict], objective: str, dm, pad_id: int, *, packed: bool) -> list[torch.Tensor]:
    """Each collated batch's mean loss over its own target tokens, from one forward pass over all of them."""
    from worker.data import IGNORE_INDEX

    width = max(b["input_ids"].shape[1] for b in batches)
    label_width = max(b["labels"].shape[1] for b in batches)
    if packed and objective == "seq2seq" and label_width == width and len(batches) > 1:
        label_width += 1  # as in _segments
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


def _run_losses(parts: list[tuple[_Member, dict]], router: _Router, model, objective: str, dm) -> list[torch.Tensor]:
    """The losses of (member, collated batch) pairs, each through its own adapter, in one forward pass."""
    batches = [batch for _, batch in parts]
    pad_id = parts[0][0].trainer.pad_id
    if len(parts) == 1:
        with router.solo(parts[0][0].adapter):
            return _losses(model, batches, objective, dm, pad_id, packed=False)
    with router.packed(_segments(parts, objective)):
        return _losses(model, batches, objective, dm, pad_id, packed=True)


def _in_step(items: list[tuple[Any, Sequence, int]]) -> Iterator[list[tuple[Any, Sequence]]]:
    """Round k: the k-th chunk (of its own size) of each (owner, sequence, size) that still has one,
    with its owner; ends when none has."""
    for k in itertools.count():
        chunks = [(owner, sequence[k * size:(k + 1) * size]) for owner, sequence, size in items
                  if len(sequence) > k * size]
        if not chunks:
            return
        yield chunks


def _evaluate_together(members: list[_Member], router: _Router, model, objective: str, dm) -> list[Any]:
    """Each member's `Trainer.evaluate()` (its held-out loss, or None), or the exception that ended it:
    the members' k-th eval batches run through the base in one forward pass."""
    from worker.data import collate

    results: list[Any] = [None] * len(members)
    todo = [i for i, member in enumerate(members) if member.trainer.eval_set and member.trainer.is_main]
    totals, counts = dict.fromkeys(todo, 0.0), dict.fromkeys(todo, 0)
    model.eval()
    try:
        with torch.no_grad():
            for chunks in _in_step([(i, members[i].trainer.eval_set, members[i].trainer.eval_batch_size)
                                    for i in todo]):
                parts = [(members[i], collate(examples, objective, members[i].trainer.pad_id))
                         for i, examples in chunks]
                for (i, _), (member, batch), loss in zip(chunks, parts,
                                                         _run_losses(parts, router, model, objective, dm), strict=True):
                    tokens = member.trainer._label_tokens(batch)
                    totals[i] += float(loss) * tokens
                    counts[i] += tokens
    except Exception as error:  # one forward pass for all: it ends them all
        if isinstance(error, torch.OutOfMemoryError):
            error = _out_of_memory("evaluating", len(todo), dm)
        return [error if i in totals else None for i in range(len(members))]
    finally:
        model.train()
    for i in todo:
        trainer = members[i].trainer
        loss = totals[i] / max(counts[i], 1)
        results[i] = loss if math.isfinite(loss) else JobError(
            trainer._non_finite("eval loss", loss, f"after step {trainer.step}"))
    return results


def _generate_together(members: list[_Member], router: _Router, model, dm) -> list[Any]:
    """Each member's `Trainer.task_metrics()` (filling its samples), or the exception that ended it: the
    members' k-th chunks of eval inputs are generated from in one `generate()` call, every job's rows
    through its own adapter, each cut to the job's own max_new_tokens as its own run would stop."""
    results: list[Any] = [None] * len(members)
    plans = []  # (index, predictor, rows, predictions)
    for i, member in enumerate(members):
        trainer = member.trainer
        if not trainer.generates_task_metrics():
            try:
                with router.solo(member.adapter):
                    results[i] = trainer.task_metrics()
            except Exception as error:
                results[i] = error
            continue
        trainer.samples = []
        plans.append((i, trainer.generation_predictor(), trainer.generated_rows(trainer.eval_rows,
                                                                                trainer.spec.num_samples), []))
    model.eval()
    try:
        with torch.no_grad():
            for chunks in _in_step([(plan, plan[2], members[plan[0]].trainer.eval_batch_size) for plan in plans]):
                _generate_round([(members[i], predictor, predictions, predictor.batch([row["input"] for row in chunk]))
                                 for (i, predictor, _, predictions), chunk in chunks], router, model, dm)
    except Exception as error:  # one generate() for all: it ends them all
        if isinstance(error, torch.OutOfMemoryError):
            error = _out_of_memory("generating for", len(plans), dm)
        for i, *_ in plans:
            results[i] = error
        return results
    finally:
        model.train()
    for i, _, rows, predictions in plans:
        try:
            results[i] = members[i].trainer.score_generations(rows, predictions, members[i].trainer.spec.num_samples)
        except Exception as error:
            results[i] = error
    return results


def _generate_round(parts: list[tuple], router: _Router, model, dm) -> None:
    """One `generate()` over the parts' (member, predictor, predictions, encoded inputs), padded to one
    width on the side each pads (the left for a decoder-only model); appends each part's texts."""
    from worker.predict import GenerationSettings

    first = parts[0][1]
    causal = first.task_type == "causal"
    width = max(inputs["input_ids"].shape[1] for *_, inputs in parts)

    def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
        extra = width - tensor.shape[1]
        return tensor if not extra else torch.nn.functional.pad(tensor, (extra, 0) if causal else (0, extra),
                                                                value=value)

    input_ids = torch.cat([widen(inputs["input_ids"], first.tokenizer.pad_token_id) for *_, inputs in parts])
    attention = torch.cat([widen(inputs["attention_mask"], 0) for *_, inputs in parts])
    settings = GenerationSettings(max_new_tokens=max(predictor.max_new_tokens for _, predictor, _, _ in parts))
    segments, start = [], 0
    for member, _, _, inputs in parts:
        rows = inputs["input_ids"].shape[0]
        segments.append(_Segment(start, start + rows, member.adapter, {}, member))
        start += rows
    route = router.solo(parts[0][0].adapter) if len(parts) == 1 else router.packed(segments)
    # under the training's autocast, as the job alone generates
    with route, dm.autocast():
        output = model.generate(input_ids=input_ids, attention_mask=attention, **settings.kwargs(),
                                pad_token_id=first.tokenizer.pad_token_id, eos_token_id=first.tokenizer.eos_token_id)
    for segment, (_, predictor, predictions, _) in zip(segments, parts, strict=True):
        predictions += predictor.decode(output[segment.start:segment.end], width, predictor.max_new_tokens)


def _finish_members(finishing: list[_Member], router: _Router, model, objective: str, device_manager,
                    setup_seconds: float) -> list[Any]:
    """The JobOutcome (or the exception that ended it) of each member whose training is done: final
    evaluation and task metrics of all of them together, then each one's artifacts."""
    evals = _evaluate_together(finishing, router, model, objective, device_manager)
    evaluated = [member for member, result in zip(finishing, evals, strict=True)
                 if not isinstance(result, BaseException)]
    metrics = dict(zip((member.index for member in evaluated),
                       _generate_together(evaluated, router, model, device_manager), strict=True))
    outcomes: list[Any] = []
    for member, final_eval in zip(finishing, evals, strict=True):
        task_metrics = final_eval if isinstance(final_eval, BaseException) else metrics[member.index]
        if isinstance(task_metrics, BaseException):
            outcomes.append(task_metrics)
            continue
        try:
            outcomes.append(_save_member(member, model, device_manager, setup_seconds, final_eval, task_metrics))
        except Exception as error:
            outcomes.append(error)
    return outcomes


def _save_member(member: _Member, model, device_manager, setup_seconds: float, final_eval: float | None,
                 task_metrics: dict):
    """The artifacts of a member whose training, evaluation and task metrics are done: its JobOutcome."""
    from worker.artifacts import write_atomically, write_job_json
    from worker.extensions.lora import save_adapter
    from worker.pipeline import JobOutcome, Progress, library_versions

    trainer, ctx, spec = member.trainer, member.ctx, member.spec
    if final_eval is not None:
        trainer.curve.append((trainer.step, "eval", final_eval))
    if ctx.should_cancel is not None and ctx.should_cancel():
        raise JobCancelled("cancelled before saving")
    metrics = {"train_loss": member.last_loss, "eval_loss": final_eval, "steps": trainer.step,
               "tokens_per_second": member.tokens / member.seconds if member.seconds > 0 else 0.0,
               "train_seconds": member.seconds, "micro_batch_size": spec.train.batch_size,
               "peak_memory_mb": device_manager.peak_memory_mb()}
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
