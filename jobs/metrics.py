"""Task metrics by name (torch-free): which objectives each applies to, and each objective's defaults.

The implementations live in worker/metrics.py under the same names. Adding a metric is one
`Metric` entry here and one function there.

    check_metrics(["accuracy", "f1"], "classification")  # -> ["accuracy", "f1"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: What a train job optimises: `seq2seq` (encoder-decoder generation), `causal` (decoder-only
#: generation, loss on the target) or `classification` (a label per input, through a head).
OBJECTIVES = ("seq2seq", "causal", "classification")


@dataclass(frozen=True)
class Metric:
    name: str
    #: the objectives whose jobs can compute it
    objectives: frozenset[str]
    higher_is_better: bool
    description: str


def _metrics(*entries: Metric) -> dict[str, Metric]:
    return {entry.name: entry for entry in entries}


CLASSIFICATION = frozenset({"classification"})
#: generative jobs: scored on greedy generations for the eval split's inputs
GENERATIVE = frozenset({"seq2seq", "causal"})

METRICS: dict[str, Metric] = _metrics(
    Metric("accuracy", CLASSIFICATION, True, "share of eval examples whose predicted label is the reference label"),
    Metric("f1", CLASSIFICATION, True, "macro F1: the unweighted mean over the labels of each label's F1 "
           "(a label never predicted nor present scores 0)"),
    Metric("exact_match", GENERATIVE, True, "share of eval examples whose generation equals the target "
           "(both stripped of surrounding whitespace)"),
    Metric("char_accuracy", GENERATIVE, True, "per example, the characters equal position by position over the "
           "longer of generation and target; averaged over the examples"),
    Metric("token_accuracy", GENERATIVE, True, "char_accuracy over the job's tokenizer's tokens instead of "
           "characters"),
    Metric("bleu", GENERATIVE, True, "corpus BLEU (sacrebleu, 0-100) of the generations against the targets"),
    Metric("rouge_l", GENERATIVE, True, "ROUGE-L F-measure (rouge-score) of each generation against its target, "
           "averaged"),
)

#: objective -> the metrics a job computes when `train.metrics` is not given
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "seq2seq": ("exact_match", "char_accuracy"),
    "causal": ("exact_match", "char_accuracy"),
    "classification": ("accuracy", "f1"),
}


def metrics_for(objective: str) -> list[str]:
    """The names of the metrics that apply to `objective`, in registry order."""
    return [name for name, metric in METRICS.items() if objective in metric.objectives]


def check_metrics(names: Sequence[str] | None, objective: str | None) -> list[str]:
    """The metrics a job computes: `names` checked against the registry, or the objective's defaults.

    With `objective` None (not known yet) only the names are checked. Raises ValueError naming
    the metric and the allowed names.
    """
    if names is None:
        return list(DEFAULT_METRICS.get(objective, ())) if objective is not None else []
    allowed = metrics_for(objective) if objective is not None else list(METRICS)
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; metrics: {', '.join(METRICS)}")
        if name not in allowed:
            usable = ", ".join(allowed) or "none yet"
            raise ValueError(f"metric {name!r} does not apply to the {objective} objective; for {objective}: {usable}")
    if len(set(names)) != len(names):
        raise ValueError("a metric is named twice in train.metrics")
    return list(names)


#: a family's task type -> the objectives a job on it can train, the default first
OBJECTIVES_BY_TASK_TYPE: dict[str, tuple[str, ...]] = {
    "seq2seq": ("seq2seq",),
    "causal": ("causal", "classification"),
    "encoder": ("classification",),
}


def resolve_objective(task_type: str, objective: str | None) -> str:
    """The objective of a job on a base of `task_type`: `objective`, or the family's default.

    Raises ValueError naming the objectives that the base can train.
    """
    allowed = OBJECTIVES_BY_TASK_TYPE[task_type]
    if objective is None:
        return allowed[0]
    if objective not in allowed:
        what = {"seq2seq": "an encoder-decoder", "causal": "a decoder-only", "encoder": "an encoder-only"}[task_type]
        raise ValueError(f"train.objective: {objective} is not possible on {what} base model; "
                         f"use {' or '.join(allowed)}")
    return objective
