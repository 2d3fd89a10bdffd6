"""Datasets: JSONL or CSV files with `input` and `target` columns, tokenised for the model family."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.errors import JobError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Read `input`/`target` rows; JobError names the `train.dataset` key and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"train.dataset: file {str(path)!r} does not exist; give a JSONL or CSV file "
                       "(relative paths are resolved against the batch file)")
    rows: list[dict[str, str]] = []
    if path.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise JobError(f"train.dataset: {path.name} line {line_no} is not valid JSON ({error})") from None
                rows.append(_check_row(row, path, line_no))
    elif path.suffix.lower() in {".csv", ".tsv"}:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for line_no, row in enumerate(reader, 2):
                rows.append(_check_row(row, path, line_no))
    else:
        raise JobError(f"train.dataset: {path.name} has an unknown extension; use .jsonl or .csv")
    if len(rows) < 2:
        raise JobError(f"train.dataset: {path.name} has {len(rows)} rows; at least 2 are needed")
    return rows


def read_mixture(paths: list[str | Path]) -> list[dict[str, str]]:
    """The rows of every file in `paths` together, file by file (a mixture; the trainer's seeded
    split and shuffle mix them). JobError from `read_rows` names the file."""
    return [row for path in paths for row in read_rows(path)]


def _check_row(row, path: Path, line_no: int) -> dict[str, str]:
    if not isinstance(row, dict) or "input" not in row or "target" not in row:
        raise JobError(f"train.dataset: {path.name} line {line_no} lacks the `input` and `target` columns "
                       "every row needs")
    return {"input": str(row["input"]), "target": str(row["target"])}


def tokenize(rows: list[dict[str, str]], tokenizer, task_type: str, max_length: int) -> list[Example]:
    """Seq2seq: encoder input / decoder labels. Causal: input + eos + target + eos, loss on the target only."""
    eos = tokenizer.eos_token_id
    examples = []
    for row in rows:
        source = tokenizer.encode(row["input"], max_length - 1)
        target = tokenizer.encode(row["target"], max_length - 1) + [eos]
        if task_type == "seq2seq":
            examples.append(Example(input_ids=source + [eos], labels=target))
        else:
            prompt = source + [eos]
            examples.append(Example(input_ids=prompt + target, labels=[IGNORE_INDEX] * len(prompt) + target))
    return examples


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split; at least one example on each side when eval_fraction > 0."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = 0 if eval_fraction <= 0 else min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    eval_set = [examples[i] for i in order[:n_eval]]
    train_set = [examples[i] for i in order[n_eval:]]
    return train_set, eval_set


def collate(batch: list[Example], task_type: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch into `input_ids`, `attention_mask` and `labels` tensors (right padding).

    Padded in Python lists and turned into one tensor each: three tensor ops for the batch,
    where filling a preallocated tensor row by row costs three per example.
    """
    width = max(len(e.input_ids) for e in batch)
    label_width = max(len(e.labels) for e in batch) if task_type == "seq2seq" else width
    input_ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in batch], dtype=torch.long)
    attention = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch],
                             dtype=torch.long)
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (label_width - len(e.labels)) for e in batch],
                          dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class StepBatches:
    """Batch `step` (0-based) of an endless, seeded shuffle: the same for a given step after a resume."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.examples), generator=generator).tolist()
            if len(self._perms) > 2:  # a batch spans at most two epochs; keep the one just made
                self._perms.pop(min(key for key in self._perms if key != epoch))
        return self._perms[epoch]

    def batch(self, step: int) -> list[Example]:
        n = len(self.examples)
        start = step * self.batch_size
        return [self.examples[self._perm(i // n)[i % n]] for i in range(start, start + self.batch_size)]
