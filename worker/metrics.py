"""The task metrics that jobs/metrics.py names (one implementation each, under the same name):
plain functions of predictions and references (labels for classification, strings for generation).

    compute(["accuracy", "f1"], predictions=[0, 1, 1], references=[0, 1, 0])
    compute(["exact_match", "token_accuracy"], ["abc"], ["abd"], tokenizer=tokenizer)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any


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


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of generations equal to their target, both stripped of surrounding whitespace."""
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)


def _position_accuracy(prediction: Sequence, reference: Sequence) -> float:
    """Items equal position by position over the longer sequence's length (1 when both are empty)."""
    longest = max(len(prediction), len(reference))
    if not longest:
        return 1.0
    return sum(p == r for p, r in zip(prediction, reference)) / longest


def char_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over the examples of `_position_accuracy` of the characters."""
    pairs = zip(predictions, references, strict=True)
    return sum(_position_accuracy(p, r) for p, r in pairs) / len(references)


def token_accuracy(predictions: Sequence[str], references: Sequence[str], tokenizer: Any) -> float:
    """char_accuracy over `tokenizer.encode`'s tokens of each generation and target."""
    pairs = zip(predictions, references, strict=True)
    return sum(_position_accuracy(tokenizer.encode(p), tokenizer.encode(r)) for p, r in pairs) / len(references)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with its default tokenisation."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """rouge-score's ROUGE-L F-measure of each generation against its target, averaged."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    pairs = zip(predictions, references, strict=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(references)


#: the metrics that compare token sequences: they take the job's tokenizer too
NEEDS_TOKENIZER = frozenset({"token_accuracy"})

IMPLEMENTATIONS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": macro_f1,
    "exact_match": exact_match,
    "char_accuracy": char_accuracy,
    "token_accuracy": token_accuracy,
    "bleu": bleu,
    "rouge_l": rouge_l,
}


def compute(names: Sequence[str], predictions: Sequence[Hashable], references: Sequence[Hashable],
            tokenizer: Any = None) -> dict[str, float]:
    """{name: value} of each metric in `names` over the examples; {} when there are none. `tokenizer`
    (the job's) is needed by the metrics in NEEDS_TOKENIZER."""
    if not references:
        return {}
    return {name: float(IMPLEMENTATIONS[name](predictions, references, tokenizer) if name in NEEDS_TOKENIZER
                        else IMPLEMENTATIONS[name](predictions, references)) for name in names}
