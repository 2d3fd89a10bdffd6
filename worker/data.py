"""Datasets: the rows of `train.dataset`'s sources (files, save_to_disk directories, `hf:` datasets
from the local cache), their columns mapped to graftq's, mixed by weight and tokenised for the
model family (input/target pairs, input/label pairs for classification, or chat conversations with
the loss on the assistant turns)."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.sources import (
    FILE_FORMATS,
    HF_PREFIX,
    datasets_cache,
    hub_snapshot,
    not_cached,
    parse_hub,
    prepared_dirs,
)
from jobs.spec import DatasetSource, TrainSpec
from worker.errors import JobError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEXT_COLUMNS = ("input", "target")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def read_rows(path: str | Path, columns: Mapping[str, str] | None = None, split_name: str = "train",
              needed: Iterable[str] = TEXT_COLUMNS) -> list[dict[str, Any]]:
    """The rows of one source, each {graftq column: value} for the `needed` columns. `columns` maps
    graftq's names to the source's. JobError names the `train.dataset` key, the source and what is wrong."""
    needed = {name: (columns or {}).get(name, name) for name in needed}
    reference = str(path)
    if reference.startswith(HF_PREFIX):
        records, shown = _hub_records(reference, split_name), reference
    else:
        path = Path(path)
        shown = path.name
        if path.is_dir():
            records = _saved_records(path, split_name)
        elif not path.is_file():
            raise JobError(f"train.dataset: file {str(path)!r} does not exist; give a JSONL, CSV or Parquet file, "
                           "a save_to_disk directory or hf:NAME (relative paths are resolved against the batch file)")
        else:
            records = _file_records(path, list(needed.values()))
    unit = "line" if FILE_FORMATS.get(Path(reference).suffix.lower()) in ("jsonl", "csv", "tsv") else "row"
    rows = [_check_row(row, needed, f"{shown} {unit} {number}") for number, row in records]
    if len(rows) < 2:
        raise JobError(f"train.dataset: {shown} has {len(rows)} rows; at least 2 are needed")
    return rows


def _file_records(path: Path, wanted: list[str]) -> Iterable[tuple[int, Any]]:
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind == "jsonl":
        return _jsonl_records(path)
    if kind in ("csv", "tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
            return list(enumerate(reader, 2))
    if kind == "parquet":
        import pyarrow.parquet

        try:
            schema = pyarrow.parquet.read_schema(path)
            table = pyarrow.parquet.read_table(path, columns=[name for name in wanted if name in schema.names])
        except (OSError, ValueError) as error:
            raise JobError(f"train.dataset: {path.name} cannot be read as Parquet ({error})") from None
        return enumerate(table.to_pylist(), 1)
    raise JobError(f"train.dataset: {path.name} has an unknown extension; use .jsonl, .csv, .tsv or .parquet")


def _jsonl_records(path: Path) -> list[tuple[int, Any]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append((line_no, json.loads(line)))
            except json.JSONDecodeError as error:
                raise JobError(f"train.dataset: {path.name} line {line_no} is not valid JSON ({error})") from None
    return records


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise JobError("train.dataset: save_to_disk directories and hf: datasets need the `datasets` package on "
                       "the worker: pip install 'graftq[worker]'") from None
    return datasets


def _saved_records(path: Path, split_name: str) -> Iterable[tuple[int, Any]]:
    datasets = _datasets_module()

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise JobError(f"train.dataset: {str(path)!r} is not a directory written by save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split_name not in loaded:
            raise JobError(f"train.split: {path.name} has no split {split_name!r} (it has "
                           f"{', '.join(loaded)}); set train.split")
        loaded = loaded[split_name]
    return enumerate(loaded.to_list(), 1)


def _hub_records(reference: str, split_name: str) -> Iterable[tuple[int, Any]]:
    """Rows of `hf:NAME[:CONFIG]` from the local cache only: the copy `load_dataset` prepared, else the
    repository snapshot `hf download` left in the hub cache. Never a download."""
    datasets = _datasets_module()

    ref = parse_hub(reference)
    datasets.disable_progress_bars()
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # whatever the worker's environment says
    try:
        if prepared_dirs(ref):
            loaded = datasets.load_dataset(ref.name, ref.config, split=split_name, cache_dir=str(datasets_cache()))
        elif (snapshot := hub_snapshot(ref)) is not None:
            loaded = datasets.load_dataset(str(snapshot), ref.config, split=split_name,
                                           cache_dir=str(datasets_cache()))
        else:
            raise JobError(f"train.dataset: {not_cached(ref)}")
    except (ValueError, KeyError, ConnectionError, FileNotFoundError) as error:
        raise JobError(f"train.dataset: cannot load {reference!r} split {split_name!r} from the local cache "
                       f"({error}); check train.split and the config name") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    return enumerate(loaded.to_list(), 1)


def _check_row(row: Any, needed: dict[str, str], where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping) or any(theirs not in row for theirs in needed.values()):
        names = [f"`{theirs}`" for theirs in needed.values()]
        columns = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise JobError(f"train.dataset: {where} lacks the {columns} column{'s' if len(names) > 1 else ''} "
                       "every row needs (train.columns maps the source's column names)")
    checked: dict[str, Any] = {}
    for ours, theirs in needed.items():
        value = row[theirs]
        if ours == "messages":
            value = _check_messages(value, where)
        elif value is None:
            raise JobError(f"train.dataset: {where}: column `{theirs}` is empty (null)")
        elif ours in TEXT_COLUMNS:
            value = str(value)
        checked[ours] = value
    return checked


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    where = f"train.dataset: {where}: `messages`"
    if not isinstance(value, list) or not value:
        raise JobError(f"{where} must be a non-empty list of {{role, content}} mappings")
    messages = []
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise JobError(f"{where}: every message needs a string `role` and a string `content`")
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(message["role"] == "assistant" for message in messages):
        raise JobError(f"{where} has no assistant turn: there is nothing to train on")
    return messages


def read_mixture(sources: list[str | Path | DatasetSource], needed: Iterable[str] = TEXT_COLUMNS) -> list[dict[str, Any]]:
    """The rows of every source together, source by source, unweighted (the trainer's seeded split and
    shuffle mix them). JobError from `read_rows` names the source."""
    return [row for rows in _read_sources(sources, tuple(needed)) for row in rows]


def _read_sources(sources: list[str | Path | DatasetSource], needed: tuple[str, ...]) -> list[list[dict[str, Any]]]:
    read = []
    for source in sources:
        if isinstance(source, DatasetSource):
            read.append(read_rows(source.path, source.columns, source.split or "train", needed))
        else:
            read.append(read_rows(source, needed=needed))
    return read


def read_training_rows(spec: TrainSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows) of `spec.dataset`.

    The held-out rows are drawn from the unweighted mixture (the seeded `split`), so a row a
    weight repeats never lands on both sides. Each training row of a source with weight w then
    appears floor(w) times, and a seeded sample (without repetition) of round(frac(w) x its
    training rows) once more: weight 2 = its rows twice, 0.5 = half of them. With every weight 1
    the training rows are the split's, in its order.
    """
    sources = spec.sources
    per_source = _read_sources(sources, spec.needed_columns)
    rows = [row for source_rows in per_source for row in source_rows]
    owner = [index for index, source_rows in enumerate(per_source) for _ in source_rows]
    # a separate eval set: every training row trains
    eval_fraction = 0.0 if spec.eval_dataset is not None else spec.eval_fraction
    train_index, eval_index = split(list(range(len(rows))), eval_fraction, spec.seed)
    eval_rows = [rows[i] for i in eval_index] if spec.eval_source is None else read_eval_rows(spec.eval_source, spec)
    weights = [source.weight for source in sources]
    if all(weight == 1 for weight in weights):
        return [rows[i] for i in train_index], eval_rows
    train_rows = [rows[i] for i in train_index for _ in range(math.floor(weights[owner[i]]))]
    for index, weight in enumerate(weights):
        mine = [i for i in train_index if owner[i] == index]
        extra = round((weight - math.floor(weight)) * len(mine))
        if extra:
            generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + 7_919 * (index + 1))
            train_rows += [rows[mine[j]] for j in torch.randperm(len(mine), generator=generator)[:extra].tolist()]
    if not train_rows:
        raise JobError("train.dataset: the weights leave no training rows; raise a weight")
    log.info("mixture: %d training rows from %s", len(train_rows),
             ", ".join(f"{source.path} x{source.weight:g}" for source in sources))
    return train_rows, eval_rows


def read_eval_rows(source: DatasetSource, spec: TrainSpec, key: str = "train.eval_dataset") -> list[dict[str, Any]]:
    """The rows of an evaluation set (`train.eval_dataset` or an `eval.datasets` entry), whole, with the
    training data's columns. JobError names `key`."""
    try:
        return read_rows(source.path, source.columns, source.split or "train", spec.needed_columns)
    except JobError as error:
        raise JobError(f"{key}: {str(error).removeprefix('train.dataset: ')}") from None


def label_set(rows: list[dict[str, Any]]) -> list[str]:
    """The distinct labels of classification rows, as text, sorted: by value when every label is an
    integer (so "10" follows "9"), else as text."""
    labels = {str(row["label"]) for row in rows}
    if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def read_labels(spec: TrainSpec) -> list[str]:
    """The label set of a classification job's training data: every row of its sources (see `label_set`)."""
    return label_set(read_mixture(spec.sources, spec.needed_columns))


def label_ids(rows: list[dict[str, Any]], labels: list[str], source: str) -> list[int]:
    """Each row's label as its index in `labels`; JobError names `source` and the unknown label."""
    index = {label: i for i, label in enumerate(labels)}
    for row in rows:
        if str(row["label"]) not in index:
            raise JobError(f"train.dataset: {source} has the label {str(row['label'])!r}, which the training data "
                           f"does not have (labels: {', '.join(labels)}); every evaluated label must be a trained one")
    return [index[str(row["label"])] for row in rows]


def tokenize(rows: list[dict[str, Any]], tokenizer, task_type: str, max_length: int,
             labels: list[str] | None = None, source: str = "the dataset") -> list[Example]:
    """Seq2seq: encoder input / decoder labels. Causal: input + eos + target + eos, loss on the target only.
    Classification: the input as the tokenizer frames a sequence (`encode_sequence`), and the label's
    index in `labels` (JobError naming `source` for an unknown one)."""
    eos = tokenizer.eos_token_id
    if task_type == "classification":
        ids = label_ids(rows, labels or [], source)
        return [Example(input_ids=tokenizer.encode_sequence(row["input"], max_length), labels=[label])
                for row, label in zip(rows, ids, strict=True)]
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


def chat_segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """The conversation as rendered by the tokenizer's chat template, cut into (text, is_assistant)
    pieces. An assistant piece is what the template adds to the conversation before it, rendered
    with the generation prompt: the reply and the template's end of turn, i.e. what the model
    generates at inference."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:index], add_generation_prompt=True)
        full = tokenizer.render_chat(messages[:index + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise JobError("train.format: chat: the tokenizer's chat template does not render a conversation "
                           "as the start of its continuation, so the assistant turns cannot be located; use a "
                           "tokenizer whose template does (or format: text)")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = tokenizer.render_chat(messages)
    if not whole.startswith(done):
        raise JobError("train.format: chat: the tokenizer's chat template renders the conversation "
                       "inconsistently; use format: text")
    segments.append((whole[len(done):], False))
    return [(text, assistant) for text, assistant in segments if text]


def tokenize_chat(rows: list[dict[str, Any]], tokenizer, task_type: str, max_length: int) -> list[Example]:
    """Chat rows (`messages`) for a causal model: the template's rendering, labels on the assistant
    pieces only (IGNORE_INDEX elsewhere), cut at max_length tokens. A conversation with no assistant
    token left within max_length is dropped (and counted in the log)."""
    if task_type != "causal":
        raise JobError(f"train.format: chat needs a decoder-only (causal) model; this one is {task_type}: "
                       "use format: text")
    if not getattr(tokenizer, "has_chat_template", False):
        raise JobError("train.format: chat needs a chat template, and the base model's tokenizer has none: "
                       "use a base model whose tokenizer_config.json has `chat_template`, or format: text")
    examples, dropped = [], 0
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        for text, assistant in chat_segments(row["messages"], tokenizer):
            piece = tokenizer.encode(text)
            ids += piece
            labels += piece if assistant else [IGNORE_INDEX] * len(piece)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append(Example(input_ids=ids, labels=labels))
    if dropped:
        log.warning("train.format: chat: %d conversation(s) have no assistant token within train.max_length=%d "
                    "and were left out", dropped, max_length)
    if rows and not examples:
        raise JobError(f"train.max_length: no conversation keeps an assistant token within max_length="
                       f"{max_length}: raise train.max_length")
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
    if task_type == "classification":  # one label index per example
        labels = torch.tensor([e.labels[0] for e in batch], dtype=torch.long)
    else:
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
