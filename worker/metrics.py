"""The task metrics that jobs/metrics.py names (one implementation each, under the same name):
plain functions of predictions and references.

    compute(["accuracy", "f1"], predictions=[0, 1, 1], references=[0, 1, 0])
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Share of positions where the prediction equals the reference."""
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def macro_f1(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """The unweighted mean of each label's F1 over the labels that occur in `references` or
    `predictions`; a label with no true positive scores 0 (also one never predicted)."""
    pairs = list(zip(predictions, references, strict=True))
    scores = []
    for label in set(predictions) | set(references):
        true_positive = sum(p == label and r == label for p, r in pairs)
        predicted = sum(p == label for p, _ in pairs)
        actual = sum(r == label for _, r in pairs)
        # F1 = 2 TP / (predicted + actual); zero when there is no true positive
        scores.append(2 * true_positive / (predicted + actual) if true_positive else 0.0)
    return sum(scores) / len(scores)


IMPLEMENTATIONS: dict[str, Callable[[Sequence[Hashable], Sequence[Hashable]], float]] = {
    "accuracy": accuracy,
    "f1": macro_f1,
}


def compute(names: Sequence[str], predictions: Sequence[Hashable], references: Sequence[Hashable]) -> dict[str, float]:
    """{name: value} of each metric in `names` over the examples; {} when there are none."""
    if not references:
        return {}
    return {name: float(IMPLEMENTATIONS[name](predictions, references)) for name in names}
