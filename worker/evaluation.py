"""Evaluation during training (`train.eval_every`): the best step so far, early stopping, the best
weights that `keep: best` saves, and the named evaluation sets (`eval.datasets`) scored after training.

    evaluation = PeriodicEvaluation(spec.train)           # the Trainer owns one
    improved = evaluation.record(step, {"eval_loss": 0.9, "exact_match": 0.5}, samples, named_params)
    evaluation.should_stop                                 # early stopping says stop
    evaluation.restore(named_params)                       # the best weights back, before saving

Its state (best step, value, patience count, curve points, the best weights) goes into the training
checkpoint, so a job resumed after a crash keeps the best it had found.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from jobs.spec import TrainSpec, as_source

if TYPE_CHECKING:
    from jobs.spec import EvalSpec
    from worker.training import Trainer

log = logging.getLogger(__name__)


class BestTracker:
    """The best value of one metric over a sequence of evaluations, and the early-stopping count.

    An evaluation is the new best when it beats the best so far (any amount). The patience count
    goes back to 0 when an evaluation beats the previous best by more than `min_delta`, and up by
    one otherwise; `should_stop` once it reaches `patience` (None: never).
    """

    def __init__(self, metric: str, maximize: bool, patience: int | None = None, min_delta: float = 0.0):
        self.metric = metric
        self.maximize = maximize
        self.patience = patience
        self.min_delta = min_delta
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.bad_evaluations = 0

    def _beats(self, value: float, other: float) -> bool:
        return value > other if self.maximize else value < other

    def update(self, step: int, value: float) -> bool:
        """Take the evaluation at `step`; True when it is the new best."""
        previous = self.best_value
        if previous is None or (self._beats(value, previous) and abs(value - previous) > self.min_delta):
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        if previous is None or self._beats(value, previous):
            self.best_step, self.best_value = step, value
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evaluations >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_value": self.best_value, "bad_evaluations": self.bad_evaluations}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.best_step = state["best_step"]
        self.best_value = state["best_value"]
        self.bad_evaluations = state["bad_evaluations"]


def tracker_for(spec: TrainSpec) -> BestTracker:
    """The tracker of a job: `early_stopping`'s metric and rule, else eval_loss (lower is better), never stopping."""
    watched = spec.early_stopping
    if watched is None:
        return BestTracker("eval_loss", maximize=False)
    return BestTracker(watched.metric, watched.maximize, watched.patience, watched.min_delta)


class PeriodicEvaluation:
    """What a Trainer with `train.eval_every` keeps between evaluations."""

    def __init__(self, spec: TrainSpec):
        self.every = spec.eval_every
        self.keep_best = spec.keep_best
        self.tracker = tracker_for(spec)
        #: (step, metric, value) of every task metric at every evaluation
        self.metric_curve: list[tuple[int, str, float]] = []
        #: the results of the latest and of the best evaluation: {"step", "values", "samples"}
        self.last: dict[str, Any] | None = None
        self.best: dict[str, Any] | None = None
        #: a copy of the trainable weights at the best evaluation (keep: best), by parameter name
        self.best_weights: dict[str, torch.Tensor] | None = None

    def due(self, step: int, total_steps: int) -> bool:
        """Whether training evaluates after optimizer step `step` (every N steps, and after the last)."""
        return step % self.every == 0 or step >= total_steps

    def record(self, step: int, values: Mapping[str, float | None], samples: list[dict[str, str]],
               named_params: Iterable[tuple[str, torch.Tensor]], *, candidate: bool = True) -> bool:
        """Take the evaluation after `step` (`values`: eval_loss and the task metrics); True when it is the
        best so far, whose weights `keep: best` then copies. The evaluation before training is not a
        `candidate`: it only gives the curves their starting point."""
        values = {name: float(value) for name, value in values.items() if value is not None}
        self.metric_curve += [(step, name, value) for name, value in values.items() if name != "eval_loss"]
        if not candidate:
            return False
        results = {"step": step, "values": values, "samples": samples}
        self.last = results
        watched = values.get(self.tracker.metric)
        if watched is None:  # a metric a generation-free evaluation lacks (chat data): no best to choose
            return False
        improved = self.tracker.update(step, float(watched))
        if improved:
            self.best = results
            if self.keep_best:
                # copy=True: on a CPU `.to("cpu")` would return the live parameter itself
                self.best_weights = {name: p.detach().to("cpu", copy=True) for name, p in named_params}
        return improved

    @property
    def should_stop(self) -> bool:
        return self.tracker.should_stop

    @property
    def kept(self) -> dict[str, Any] | None:
        """The results of the evaluation whose weights are saved: the best (keep: best) or the latest."""
        return self.best if self.keep_best and self.best is not None else self.last

    def restore(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> bool:
        """Copy the best weights back into the model (keep: best); False when there are none to restore."""
        if not self.keep_best or self.best_weights is None:
            return False
        with torch.no_grad():
            for name, p in named_params:
                p.copy_(self.best_weights[name])
        return True

    def summary(self) -> dict[str, Any]:
        """The row's best_step, best_metric and best_value (keep: best), else nulls."""
        if not self.keep_best or self.tracker.best_step is None:
            return {"best_step": None, "best_metric": None, "best_value": None}
        return {"best_step": self.tracker.best_step, "best_metric": self.tracker.metric,
                "best_value": self.tracker.best_value}

    # -- checkpoints ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON for the training checkpoint (the best weights go to their own safetensors file)."""
        return {"tracker": self.tracker.state(), "metric_curve": self.metric_curve, "last": self.last,
                "best": self.best}

    def load_state(self, state: Mapping[str, Any], best_weights: dict[str, torch.Tensor] | None) -> None:
        self.tracker.load_state(state["tracker"])
        self.metric_curve = [tuple(point) for point in state["metric_curve"]]
        self.last, self.best = state["last"], state["best"]
        self.best_weights = best_weights


def evaluate_sets(trainer: Trainer, sets: EvalSpec | None) -> dict[str, dict[str, float]]:
    """{name: {eval_loss, metric: value}} of each `eval.datasets` set, on the model as it is now (the kept
    weights). Raises JobError naming the set's key when it cannot be read."""
    from worker.data import read_eval_rows

    if sets is None or not sets.datasets:
        return {}
    spec = trainer.spec
    found: dict[str, dict[str, float]] = {}
    for name, item in sets.datasets.items():
        key = f"eval.datasets.{name}"
        rows = read_eval_rows(as_source(item, spec.columns, spec.split), spec, key)
        examples = trainer.encode(rows, key)
        loss = trainer.evaluate(examples)
        found[name] = {"eval_loss": loss, **trainer.task_metrics(rows, examples)}
        log.info("evaluation set %s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in found[name].items()))
    return found
