"""Training with a fixed skeleton: setup() -> train() -> save_checkpoint() -> cleanup().

The objective (`task_type` here): seq2seq, causal LM (loss on the target only) or classification
(cross-entropy on a head's logits; `task_metrics` then scores the eval split's predicted labels).
An optimizer step accumulates `grad_accum_steps` micro-batches, each weighted by its share of the
step's target tokens, so its gradient is that of one batch of them all; gradients are clipped
(`max_grad_norm`) before the step, and the learning rate follows `lr_scheduler` after the warm-up.
Checkpoints (trainable weights, optimizer, scheduler and loss-scaler state, step) are safetensors + JSON,
written atomically, so a job re-run after its worker died resumes where it stopped. When the
stop check raises `JobInterrupted` (the worker is shutting down) a checkpoint of the current step
is written before the exception leaves `train()`.
With `train.eval_every` the model is evaluated every N steps (worker/evaluation.py): early stopping,
and the best evaluation's weights restored at the end for `keep: best`; its state is checkpointed too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jobs.metrics import OBJECTIVES
from jobs.spec import TrainSpec
from worker.artifacts import replace_directory
from worker.data import Example, StepBatches, collate, read_training_rows, tokenize, tokenize_chat
from worker.device import DeviceManager
from worker.distributed import data_parallel
from worker.errors import JobCancelled, JobError, JobInterrupted, OutOfMemory
from worker.evaluation import PeriodicEvaluation

CHECKPOINT_STATE = "trainer_state.json"
#: the trainable weights of the best evaluation so far (keep: best), in the checkpoint
BEST_WEIGHTS = "best.safetensors"

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    train_loss: float | None
    eval_loss: float | None
    steps: int
    tokens_per_second: float
    train_seconds: float
    resumed_from: int = 0
    curve: list[tuple[int, str, float]] = field(default_factory=list)
    #: (step, task metric, value) of the periodic evaluations (train.eval_every)
    metric_curve: list[tuple[int, str, float]] = field(default_factory=list)
    #: best_step, best_metric, best_value (keep: best), else empty
    best: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, model: torch.nn.Module, tokenizer, task_type: str, spec: TrainSpec,
                 device_manager: DeviceManager, *,
                 on_step: Callable[[int, int, float], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 checkpoint_dir: Path | None = None, labels: list[str] | None = None,
                 after_step: Callable[[int], None] = lambda step: None,
                 on_log: Callable[[int, dict[str, float]], None] | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None):
        if task_type not in OBJECTIVES:
            raise JobError(f"train.objective: {task_type!r} is not one of {', '.join(OBJECTIVES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.task_type = task_type
        #: the classifier's labels, by index (classification)
        self.labels = labels
        self.spec = spec
        self.dm = device_manager
        self.on_step = on_step
        self.should_cancel = should_cancel
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.after_step = after_step
        #: called with (step, {name: value}): the train loss after each step, the eval loss (and metrics) after
        #: each evaluation; the experiment trackers' feed
        self.on_log = on_log or (lambda step, values: None)
        #: called with the checkpoint directory after each save (worker.storage uploads it)
        self.on_checkpoint = on_checkpoint
        self.evaluation = PeriodicEvaluation(spec) if spec.eval_every else None
        #: this process's rank of a multi-device job (None alone); only rank 0 evaluates and writes
        self.parallel = data_parallel()
        self.is_main = self.parallel is None or self.parallel.is_main
        self.eval_batch_size = spec.eval_batch_size or spec.batch_size
        self.step = 0
        self.checkpointed_step = 0
        self.curve: list[tuple[int, str, float]] = []
        #: up to `train.num_samples` eval rows' {input, target, prediction}, filled by `task_metrics`
        self.samples: list[dict[str, str]] = []

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        train_rows, eval_rows = read_training_rows(spec)
        #: the held-out rows as read: the generative metrics generate from their inputs
        self.eval_rows = eval_rows
        self.train_set = self.encode(train_rows, ", ".join(spec.datasets))
        self.eval_set = self.encode(eval_rows, ", ".join(spec.datasets) if spec.eval_dataset is None
                                    else "train.eval_dataset")
        # micro-batch i of the endless shuffle; optimizer step s uses micro-batches s*accum .. s*accum+accum-1
        self.batches = StepBatches(self.train_set, spec.batch_size, spec.seed)
        if spec.max_steps is not None:
            self.total_steps = spec.max_steps
        else:
            self.total_steps = max(1, math.ceil(spec.epochs * len(self.train_set) / spec.effective_batch_size))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise JobError("the extended model has no trainable parameters; check the extension settings")
        if spec.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.lr_factor(step))
        self.pad_id = self.tokenizer.pad_token_id
        log.info("training %d steps of %d examples (batch_size %d x grad_accum_steps %d), %s, %s schedule",
                 self.total_steps, spec.effective_batch_size, spec.batch_size, spec.grad_accum_steps,
                 spec.optimizer, spec.lr_scheduler)
        self.scaler = self.dm.grad_scaler()
        if self.checkpoint_dir is not None and (self.checkpoint_dir / CHECKPOINT_STATE).exists():
            self._load_checkpoint()

    def encode(self, rows: list[dict], source: str) -> list[Example]:
        """`rows` tokenised for this job's objective and format; `source` names them in errors."""
        spec = self.spec
        if self.task_type == "classification":
            return tokenize(rows, self.tokenizer, self.task_type, spec.max_length, self.labels, source)
        encode = tokenize_chat if spec.format == "chat" else tokenize
        return encode(rows, self.tokenizer, self.task_type, spec.max_length)

    def _enable_gradient_checkpointing(self) -> None:
        # Non-reentrant checkpointing computes the gradients of parameters inside a checkpointed
        # block even when its inputs need none (a frozen base under an adapter), so PEFT models
        # need no `enable_input_require_grads` hook.
        kwargs = {"use_reentrant": False}
        if not getattr(self.model, "supports_gradient_checkpointing", True):
            raise JobError("train.gradient_checkpointing: this model does not support gradient checkpointing; "
                           "leave it out")
        if hasattr(self.model, "activation_checkpointing_enable"):  # the newer transformers name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        spec = self.spec
        kwargs: dict = {"weight_decay": spec.weight_decay}
        if spec.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            # the given learning rate, not Adafactor's own relative-step schedule
            optimizer_class = Adafactor
            kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
        elif spec.optimizer == "adamw_8bit":
            optimizer_class = self._adamw_8bit()
        else:
            optimizer_class = torch.optim.AdamW
            # one kernel for all tensors instead of a Python loop over them: a LoRA step's optimizer
            # update costs about a tenth on CPU (and equals the loop's to float rounding)
            if self.dm.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in self.params):
                kwargs["fused"] = True
        if spec.loraplus_lr_ratio is None:
            return optimizer_class(self.params, lr=spec.learning_rate, **kwargs)
        from peft.optimizers import create_loraplus_optimizer

        if not any("lora_B" in name for name, p in self.model.named_parameters() if p.requires_grad):
            raise JobError("train.loraplus_lr_ratio: the model has no trainable LoRA B matrices; LoRA+ needs a "
                           "LoRA adapter (extension lora or hybrid)")
        return create_loraplus_optimizer(self.model, optimizer_class, lr=spec.learning_rate,
                                         loraplus_lr_ratio=spec.loraplus_lr_ratio,
                                         loraplus_weight_decay=spec.weight_decay, **kwargs)

    def _adamw_8bit(self) -> type[torch.optim.Optimizer]:
        if self.dm.device.type != "cuda":
            raise JobError(f"train.optimizer: adamw_8bit needs CUDA (bitsandbytes), and this job runs on "
                           f"{self.dm.device}; use optimizer: adamw, or device: cuda")
        try:
            import bitsandbytes
        except ImportError:
            raise JobError("train.optimizer: adamw_8bit needs the bitsandbytes package on the worker; install it "
                           "or use optimizer: adamw") from None
        return bitsandbytes.optim.AdamW8bit

    def lr_factor(self, step: int) -> float:
        """The learning rate of optimizer step `step + 1` as a fraction of `learning_rate`."""
        spec = self.spec
        warmup = spec.warmup_steps
        if warmup and step < warmup:
            return (step + 1) / warmup
        if spec.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        if spec.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # -- the loss step ----------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.dm.device) for k, v in batch.items()}
        with self.dm.autocast():
            return self.model(**batch).loss

    def _tokens(self, examples: list[Example]) -> int:
        """Tokens a step processes: the inputs, and for seq2seq the decoder labels too.

        Counted from the examples' lengths (what the padded batch's masks would sum to) rather
        than with tensor reductions: two fewer ops and synchronisations per step.
        """
        tokens = sum(len(example.input_ids) for example in examples)
        if self.task_type == "seq2seq":
            tokens += sum(len(example.labels) for example in examples)
        return tokens

    @torch.no_grad()
    def evaluate(self, examples: list[Example] | None = None) -> float | None:
        """Token-weighted mean loss over `examples`, by default the held-out split (None without one,
        and on every rank of a multi-device job but the first, which alone evaluates)."""
        examples = self.eval_set if examples is None else examples
        if not examples or not self.is_main:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(examples), self.eval_batch_size):
            batch = collate(examples[start:start + self.eval_batch_size], self.task_type, self.pad_id)
            loss = self._loss(batch)
            n = self._label_tokens(batch)
            total += float(loss) * n
            count += n
        self.model.train(was_training)
        loss = total / max(count, 1)
        if not math.isfinite(loss):
            raise JobError(self._non_finite("eval loss", loss, f"after step {self.step}"))
        return loss

    def _label_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The items the model's mean loss over `batch` averages: target tokens (a causal model predicts
        from the second on), or examples where labels are one per example."""
        labels = batch["labels"][:, 1:] if self.task_type == "causal" else batch["labels"]
        return int((labels != -100).sum())

    @torch.no_grad()
    def task_metrics(self, rows: list[dict] | None = None, examples: list[Example] | None = None) -> dict[str, float]:
        """The `train.metrics` on the held-out split ({} without one, or without metrics); fills
        `samples` with the first `train.num_samples` eval rows' input / target / prediction. Given
        `rows` and their `examples` (another evaluation set), the metrics on those, samples untouched."""
        from worker.metrics import compute

        own = rows is None
        if own:
            rows, examples = self.eval_rows, self.eval_set
            self.samples = []
        num_samples = self.spec.num_samples if own else 0
        if not examples or not self.is_main or not (self.spec.metrics or num_samples):
            return {}
        if self.task_type != "classification":
            return self._generative_metrics(rows, num_samples)
        # without metrics only the samples' rows are predicted
        count = len(examples) if self.spec.metrics else min(num_samples, len(examples))
        was_training = self.model.training
        self.model.eval()
        predictions: list[int] = []
        references: list[int] = []
        for start in range(0, count, self.eval_batch_size):
            batch = collate(examples[start:min(start + self.eval_batch_size, count)], self.task_type,
                            self.pad_id)
            labels = batch.pop("labels")
            with self.dm.autocast():
                logits = self.model(**{k: v.to(self.dm.device) for k, v in batch.items()}).logits
            predictions += logits.argmax(-1).tolist()
            references += labels.tolist()
        self.model.train(was_training)
        names = self.labels or []
        if own:
            self.samples = [
                {"input": str(row["input"]), "target": str(names[reference]),
                 "prediction": str(names[prediction])}
                for row, reference, prediction in zip(rows[:num_samples], references, predictions, strict=False)
            ]
        return compute(self.spec.metrics, predictions, references) if self.spec.metrics else {}

    def generates_task_metrics(self) -> bool:
        """Whether `task_metrics()` generates from the held-out inputs (a generative job with metrics or
        samples, not a chat job)."""
        return bool(self.eval_set and self.is_main and (self.spec.metrics or self.spec.num_samples)
                    and self.task_type != "classification" and self.spec.format != "chat")

    def generation_predictor(self):
        """A worker.predict Predictor over the model in training: the eval generations are `graftq
        predict`'s (same encoding, padding and decoding)."""
        from worker.predict import Predictor

        return Predictor(model=self.model, tokenizer=self.tokenizer, info={}, device=self.dm.device,
                         max_length=self.spec.max_length, task_type=self.task_type,
                         max_new_tokens=self.max_new_tokens())

    def max_new_tokens(self) -> int:
        """`train.max_new_tokens`, else the longest eval target in tokens + 8, at most max_length."""
        if self.spec.max_new_tokens is not None:
            return self.spec.max_new_tokens
        longest = max((len(self.tokenizer.encode(row["target"])) for row in self.eval_rows), default=0)
        return min(longest + 8, self.spec.max_length)

    def _generative_metrics(self, rows: list[dict], num_samples: int) -> dict[str, float]:
        from worker.predict import GenerationSettings

        if self.spec.format == "chat":
            # a conversation has no single input/target pair to generate from and compare with
            log.info("task metrics are not computed for chat data")
            return {}
        predictor = self.generation_predictor()
        settings = GenerationSettings(max_new_tokens=predictor.max_new_tokens)
        eval_rows = self.generated_rows(rows, num_samples)
        rows = [{"input": row["input"]} for row in eval_rows]
        was_training = self.model.training
        self.model.eval()
        try:
            # under the training's autocast: a low-precision base can hold float32 trainable weights
            with self.dm.autocast():
                predictions = [line["prediction"] for line in
                               predictor.predict(rows, settings, batch_size=self.eval_batch_size)]
        finally:
            self.model.train(was_training)
        return self.score_generations(eval_rows, predictions, num_samples)

    def generated_rows(self, rows: list[dict], num_samples: int) -> list[dict]:
        """The rows whose inputs are generated from: all of them for the metrics (which give the samples
        too), else only the samples' rows."""
        return rows if self.spec.metrics else rows[:num_samples]

    def score_generations(self, eval_rows: list[dict], predictions: list[str], num_samples: int) -> dict[str, float]:
        """The metrics of `predictions` (one per row of `generated_rows`); the first `num_samples` of
        them become the samples."""
        from worker.metrics import compute

        references = [row["target"] for row in eval_rows]
        if num_samples:
            self.samples = [{"input": str(row["input"]), "target": str(row["target"]), "prediction": prediction}
                            for row, prediction in zip(eval_rows[:num_samples], predictions, strict=False)]
        if not self.spec.metrics:
            return {}
        return compute(self.spec.metrics, predictions, references, tokenizer=self.tokenizer)

    def _non_finite(self, what: str, value: float, when: str) -> str:
        return (f"{what} is {value} {when} with dtype {self.dm.dtype_name} on {self.dm.device}; set dtype: "
                "float32 (or bfloat16 where the device has it) or lower train.learning_rate")

    # -- train ------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        resumed_from = self.step
        initial_eval = final_eval = last_loss = None
        tokens = 0
        phase = "eval"
        # An OOM anywhere here is recovered outside the except block: the traceback holds the
        # frames of the failed step, and with them its graph (see _raise_oom).
        try:
            if resumed_from == 0:
                initial_eval = self.evaluate()
                if initial_eval is not None:
                    self.curve.append((0, "eval", initial_eval))
                values = {"eval_loss": initial_eval} if initial_eval is not None else {}
                if self.evaluation is not None:  # the metrics' starting point too (not a candidate for best)
                    values.update(self.task_metrics())
                    self.evaluation.record(0, values, [], (), candidate=False)
                if values:
                    self.on_log(0, values)
            self.model.train()
            phase = "train"
            started = time.perf_counter()
            while self.step < self.total_steps:
                if self.should_cancel is not None and self._stop_requested():
                    raise JobCancelled(f"cancelled at step {self.step}")
                micro_batches = self.micro_batches(self.step)
                last_loss = self._train_step(micro_batches)
                self.step += 1
                tokens += sum(self._tokens(examples) for examples in micro_batches)
                self.curve.append((self.step, "train", last_loss))
                self.on_log(self.step, {"train_loss": last_loss})
                self.dm.sample_memory()
                if self.on_step is not None:
                    self.on_step(self.step, self.total_steps, last_loss)
                if self.evaluation is not None and self.evaluation.due(self.step, self.total_steps):
                    phase = "eval"
                    if self._evaluate_periodically():
                        break
                    phase = "train"
                if (self.checkpoint_dir is not None and self.spec.checkpoint_every
                        and self.step % self.spec.checkpoint_every == 0 and self.step < self.total_steps):
                    self.save_checkpoint()
            seconds = time.perf_counter() - started
            phase = "eval"
            if self.evaluation is None:
                # an untrained job (max_steps: 0) is its step-0 evaluation
                final_eval = self.evaluate() if self.step else initial_eval
            else:
                final_eval = self._keep()
        except torch.OutOfMemoryError:
            oom = True
        else:
            oom = False
        if oom:
            self._raise_oom(phase)
        if final_eval is not None and self.evaluation is None and self.step:
            self.curve.append((self.step, "eval", final_eval))
            self.on_log(self.step, {"eval_loss": final_eval})
        evaluation = self.evaluation
        return TrainResult(
            train_loss=last_loss, eval_loss=final_eval, steps=self.step,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0, train_seconds=seconds,
            resumed_from=resumed_from, curve=self.curve,
            metric_curve=evaluation.metric_curve if evaluation is not None else [],
            best=evaluation.summary() if evaluation is not None else {},
        )

    # -- evaluation during training (train.eval_every) ------------------------------------------------
    def _named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        names = self._trainable_names()
        return [(names[id(p)], p) for p in self.params]

    def _evaluate_periodically(self) -> bool:
        """Evaluate after the current step (eval loss and the task metrics); True when early stopping says stop."""
        loss = self.evaluate()
        if loss is not None:
            self.curve.append((self.step, "eval", loss))
        values = {"eval_loss": loss, **self.task_metrics()}
        values = {name: value for name, value in values.items() if value is not None}
        if self.evaluation.record(self.step, values, self.samples, self._named_trainable()):
            log.info("step %d: best %s so far (%.4g)", self.step, self.evaluation.tracker.metric,
                     self.evaluation.tracker.best_value)
        self.on_log(self.step, values)
        stop = self.evaluation.should_stop
        if self.parallel is not None:
            stop = self.parallel.first_rank_says(stop)
        if stop and self.is_main:
            tracker = self.evaluation.tracker
            log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4g at step %d)",
                     self.step, tracker.metric, tracker.bad_evaluations, tracker.best_value, tracker.best_step)
        return stop

    def _keep(self) -> float | None:
        """After the last step: the best evaluation's weights back in the model (keep: best); returns the eval
        loss of the weights that are kept."""
        last = self.evaluation.last
        if last is None or last["step"] != self.step:  # a job resumed at its end: evaluate what it has
            self._evaluate_periodically()
        if self.evaluation.restore(self._named_trainable()):
            log.info("keeping the weights of step %d (best %s %.4g)", self.evaluation.tracker.best_step,
                     self.evaluation.tracker.metric, self.evaluation.tracker.best_value)
        kept = self.evaluation.kept
        return kept["values"].get("eval_loss") if kept is not None else None

    def kept_results(self) -> tuple[dict[str, float], list[dict[str, str]]]:
        """(task metrics, samples) of the weights training ended with: the kept evaluation's when
        `train.eval_every` evaluated them, else computed now (`task_metrics`)."""
        kept = self.evaluation.kept if self.evaluation is not None else None
        if kept is None:
            return self.task_metrics(), self.samples
        return {name: value for name, value in kept["values"].items() if name != "eval_loss"}, kept["samples"]

    def micro_batches(self, step: int) -> list[list[Example]]:
        """The micro-batches of optimizer step `step` (0-based): the same after a resume."""
        accum = self.spec.grad_accum_steps
        return [self.batches.batch(step * accum + k) for k in range(accum)]

    def accumulate(self, micro_batches: list[list[Example]]) -> float:
        """Backward over the micro-batches of one step; returns the step's loss.

        The model's loss is a mean over a micro-batch's target tokens; weighting each by its share
        of the step's tokens makes the summed gradient that of the mean over all of them (one
        large batch), not a mean of per-micro-batch means.
        """
        if self.parallel is not None:  # this rank's share, then the sum over all ranks
            return self.parallel.accumulate(self, micro_batches)
        batches = [collate(examples, self.task_type, self.pad_id) for examples in micro_batches]
        counts = [self._label_tokens(batch) for batch in batches]
        total = sum(counts)
        value = 0.0
        for batch, count in zip(batches, counts):
            loss = self._loss(batch)
            if len(batches) > 1:
                loss = loss * (count / max(total, 1))
            # Always through the scaler: disabled (fp32, bf16) it passes everything through.
            self.scaler.scale(loss).backward()
            value += float(loss.detach())
            del loss
        return value

    def _train_step(self, micro_batches: list[list[Example]]) -> float:
        """One optimizer step; returns its loss. The graph lives in this frame only."""
        value = self.accumulate(micro_batches)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise JobError(self._non_finite("training loss", value, f"at step {self.step + 1}"))
        if self.spec.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.after_step(self.step)  # the extension's per-step work (AdaLoRA), while the gradients exist
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _stop_requested(self) -> bool:
        try:
            return self.should_cancel()
        except JobInterrupted:
            # The worker is shutting down: keep the steps done so far, the next attempt resumes here.
            if self.checkpoint_dir is not None and self.step > self.checkpointed_step:
                self.save_checkpoint()
            raise

    def _raise_oom(self, phase: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.dm.release()
        spec = self.spec
        if phase == "eval":
            advice = (f"evaluating after step {self.step} with train.eval_batch_size={self.eval_batch_size}; "
                      "lower train.eval_batch_size")
        elif spec.batch_size == 1:
            advice = (f"at step {self.step + 1} with train.batch_size=1, the smallest micro-batch; set "
                      "train.gradient_checkpointing: true, use a smaller lora.r or a GPU with more free memory, "
                      "or lower")
        else:
            advice = (f"at step {self.step + 1} with train.batch_size={spec.batch_size}; lower "
                      "train.batch_size (raise train.grad_accum_steps to keep the effective batch), set "
                      "train.gradient_checkpointing: true, or use a smaller lora.r")
        raise OutOfMemory(f"out of memory on {self.dm.device} {advice} or train.max_length "
                          f"(now {spec.max_length})", phase=phase, step=self.step)

    # -- checkpoints ------------------------------------------------------------------------
    def _trainable_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        """Write weights, optimizer and scheduler state atomically (temp dir, then rename)."""
        target = self.checkpoint_dir
        if not self.is_main:  # rank 0 holds the same state and writes it
            self.checkpointed_step = self.step
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        names = self._trainable_names()
        weights = {names[id(p)]: p.detach().to("cpu").contiguous() for p in self.params}
        save_file(weights, str(staging / "weights.safetensors"))
        optimizer_state = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, state in optimizer_state["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        save_file(tensors, str(staging / "optimizer.safetensors"))
        # the accumulation position: a checkpoint is only written between optimizer steps, so the
        # next micro-batch is the first of step `step`
        state = {"step": self.step, "batch_size": self.spec.batch_size, "grad_accum_steps": self.spec.grad_accum_steps,
                 "next_micro_batch": self.step * self.spec.grad_accum_steps,
                 "param_names": [names[id(p)] for p in self.params],
                 "param_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars,
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "curve": self.curve}
        if self.evaluation is not None:
            state["evaluation"] = self.evaluation.state()
            if self.evaluation.best_weights is not None:
                save_file(self.evaluation.best_weights, str(staging / BEST_WEIGHTS))
        (staging / CHECKPOINT_STATE).write_text(json.dumps(state))
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        replace_directory(staging, target)
        self.checkpointed_step = self.step
        if self.on_checkpoint is not None:
            self.on_checkpoint(target)
        return target

    def _load_checkpoint(self) -> None:
        directory = self.checkpoint_dir
        state = json.loads((directory / CHECKPOINT_STATE).read_text())
        names = self._trainable_names()
        if state["param_names"] != [names[id(p)] for p in self.params]:
            raise JobError("the training checkpoint does not match this job's trainable parameters; "
                           f"delete {directory} to start over")
        # Step s trains on examples s*E .. s*E+E-1 of the shuffle (E = the effective batch), however
        # they are split into micro-batches: a checkpoint of the same E resumes exactly (OOM back-off).
        saved_accum = state.get("grad_accum_steps", 1)
        saved_batch = state.get("batch_size", self.spec.batch_size)
        if saved_batch * saved_accum != self.spec.effective_batch_size:
            raise JobError(f"the training checkpoint was written with train.batch_size={saved_batch} x "
                           f"grad_accum_steps={saved_accum}, and this job has {self.spec.batch_size} x "
                           f"{self.spec.grad_accum_steps}; delete {directory} to start over")
        weights = load_file(str(directory / "weights.safetensors"))
        with torch.no_grad():
            for p in self.params:
                p.copy_(weights[names[id(p)]])
        tensors = load_file(str(directory / "optimizer.safetensors"))
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value  # load_state_dict places it
        for key, value in state["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when saved without loss scaling
            self.scaler.load_state_dict(state["scaler"])
        self.step = self.checkpointed_step = state["step"]
        self.curve = [tuple(point) for point in state["curve"]]
        if self.evaluation is not None and state.get("evaluation"):
            best = directory / BEST_WEIGHTS
            self.evaluation.load_state(state["evaluation"], load_file(str(best)) if best.exists() else None)

    def cleanup(self) -> None:
        """Drop the optimizer state (the largest per-job allocation) and free cached memory."""
        self.optimizer = None
        self.scheduler = None
        self.params = []
        if self.evaluation is not None:
            self.evaluation.best_weights = None
        self.dm.release()
