"""Batched inference with a finished job's model: what `graftq predict` runs.

    predictor = Predictor.from_job_dir(job_dir, device="auto")
    for line in predictor.predict([{"input": "abc"}], GenerationSettings(max_new_tokens=16)):
        print(line["prediction"])

Inputs are encoded as training encoded them (the input's tokens, then eos); a decoder-only
model continues the prompt, so its batches are padded on the left.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jobs.spec import JobSpec, TrainSpec
from worker.errors import JobError


@dataclass
class GenerationSettings:
    """`generate()` settings of `graftq predict` (greedy decoding by default)."""

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    #: sampling draws from torch's generator, seeded with this before the first batch
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                                    "do_sample": self.do_sample}
        if self.do_sample:
            settings.update({key: value for key, value in (("temperature", self.temperature), ("top_p", self.top_p))
                             if value is not None})
        return settings


def read_inputs(path: str | Path, column: str = "input") -> list[dict[str, str]]:
    """Rows `{"input": ..., ["target": ...]}` of a JSONL or CSV file; the input is its `column`.

    Raises JobError naming the file, the line and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise JobError(f"--file: {str(path)!r} does not exist; give a JSONL or CSV file")
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json", ".ndjson"}:
        with path.open(encoding="utf-8") as handle:
            records = []
            for line_no, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append((line_no, json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise JobError(f"--file: {path.name} line {line_no} is not valid JSON ({error})") from None
    elif suffix in {".csv", ".tsv"}:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            records = list(enumerate(reader, 2))
    else:
        raise JobError(f"--file: {path.name} has an unknown extension; use .jsonl or .csv")
    rows = []
    for line_no, record in records:
        if not isinstance(record, dict) or record.get(column) is None:
            raise JobError(f"--file: {path.name} line {line_no} has no {column!r} column; name the input column "
                           "with --column")
        row = {"input": str(record[column])}
        if record.get("target") is not None:
            row["target"] = str(record["target"])
        rows.append(row)
    return rows


def is_classifier(model: torch.nn.Module, info: dict) -> bool:
    """A sequence classifier: the job recorded `labels`, or the model is a *ForSequenceClassification."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(info.get("labels")) or type(inner).__name__.endswith("ForSequenceClassification")


def label_names(model: torch.nn.Module, info: dict) -> list[str]:
    """The classifier's labels by class index: the job's `labels`, else the model config's id2label."""
    if info.get("labels"):
        return [str(label) for label in info["labels"]]
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label.get(index, index)) for index in range(len(id2label))]


def load_model(job_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """`worker.pipeline.load_job_model`, with a JobError naming the directory when its artifacts are
    missing or damaged."""
    from worker.pipeline import load_job_model

    try:
        return load_job_model(job_dir, device, dtype)
    except JobError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise JobError(f"cannot rebuild the job's model from {job_dir}: {type(error).__name__}: {error}; "
                       "are its artifacts complete?") from error


@dataclass
class Predictor:
    """A job's model and tokenizer, ready for batched predictions."""

    model: torch.nn.Module
    tokenizer: Any
    info: dict
    device: torch.device
    max_length: int
    task_type: str  # "seq2seq", "causal" or "classification"
    #: the default of GenerationSettings.max_new_tokens for this job
    max_new_tokens: int = 64
    #: a `train.format: chat` job: an input is a user message, rendered with the chat template
    chat: bool = False
    labels: list[str] = field(default_factory=list)

    @classmethod
    def from_job_dir(cls, job_dir: str | Path, device: str = "auto", dtype: str = "auto") -> Predictor:
        from worker.architectures import architecture_for

        model, tokenizer, info = load_model(job_dir, device, dtype)
        spec = JobSpec.model_validate(info["spec"])
        train = spec.train if spec.train is not None else TrainSpec.model_construct()
        max_length = getattr(train, "max_length", None) or TrainSpec.model_fields["max_length"].default
        if is_classifier(model, info):
            task_type, labels = "classification", label_names(model, info)
        else:
            task_type, labels = architecture_for(model).task_type, []
            if task_type not in ("seq2seq", "causal"):
                raise JobError(f"job {info.get('job_id')}: a {task_type} model neither generates nor classifies; "
                               "predict needs a seq2seq, causal or classifier job")
        # targets were truncated to max_length tokens in training: a longer output was never learned
        max_new_tokens = getattr(train, "max_new_tokens", None) or max_length
        return cls(model=model, tokenizer=tokenizer, info=info, device=next(model.parameters()).device,
                   max_length=max_length, task_type=task_type, labels=labels, max_new_tokens=max_new_tokens,
                   chat=getattr(train, "format", "text") == "chat")

    def encode(self, text: str) -> list[int]:
        """The input as training saw it: its tokens (at most max_length - 1), then eos; for a chat job,
        a conversation of one user message and the template's generation prompt; for a classifier, the
        tokenizer's `encode_sequence` (a hub tokenizer's special tokens around the text)."""
        if self.chat:
            return self.tokenizer.encode(self.tokenizer.render_chat([{"role": "user", "content": text}],
                                                                    add_generation_prompt=True))
        if self.task_type == "classification":  # framed as a classification job's inputs are
            return self.tokenizer.encode_sequence(text, self.max_length)
        return self.tokenizer.encode(text, self.max_length - 1) + [self.tokenizer.eos_token_id]

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded `input_ids` and `attention_mask`; on the left for a decoder-only model that generates."""
        encoded = [self.encode(text) for text in texts]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        left = self.task_type == "causal"
        ids, mask = [], []
        for tokens in encoded:
            padding = width - len(tokens)
            ids.append([pad] * padding + tokens if left else tokens + [pad] * padding)
            mask.append([0] * padding + [1] * len(tokens) if left else [1] * len(tokens) + [0] * padding)
        return {"input_ids": torch.tensor(ids, dtype=torch.long, device=self.device),
                "attention_mask": torch.tensor(mask, dtype=torch.long, device=self.device)}

    @torch.no_grad()
    def predict_batch(self, texts: Sequence[str], settings: GenerationSettings,
                      scores: bool = False) -> list[dict[str, Any]]:
        """One `{"prediction": ...}` per text (with `"scores"`: label -> probability, for a classifier
        when `scores`)."""
        inputs = self.batch(texts)
        if self.task_type == "classification":
            probabilities = torch.softmax(self.model(**inputs).logits.float(), dim=-1)
            results = []
            for row in probabilities.tolist():
                best = max(range(len(row)), key=row.__getitem__)
                result: dict[str, Any] = {"prediction": self.labels[best] if best < len(self.labels) else best}
                if scores:
                    result["scores"] = {self._label(index): value for index, value in enumerate(row)}
                results.append(result)
            return results
        output = self.model.generate(**inputs, **settings.kwargs(), pad_token_id=self.tokenizer.pad_token_id,
                                     eos_token_id=self.tokenizer.eos_token_id)
        return [{"prediction": text} for text in self.decode(output, inputs["input_ids"].shape[1])]

    def decode(self, output: torch.Tensor, prompt_width: int, max_new_tokens: int | None = None) -> list[str]:
        """The texts `generate()` returned for a batch whose prompts were `prompt_width` wide, each up
        to eos; with `max_new_tokens`, as if generation had stopped after that many tokens (greedy
        decoding gives a longer run's first tokens)."""
        if self.task_type == "causal":
            output = output[:, prompt_width:]  # the continuation, without the prompt
            if max_new_tokens is not None:
                output = output[:, :max_new_tokens]
        elif max_new_tokens is not None:
            output = output[:, :1 + max_new_tokens]  # after the decoder's start token
        return [self.tokenizer.decode(self._until_eos(sequence.tolist())) for sequence in output]

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)

    def _until_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return ids[:ids.index(eos)] if eos in ids else ids

    def predict(self, rows: Sequence[dict[str, str]], settings: GenerationSettings | None = None, *,
                batch_size: int = 16, scores: bool = False,
                on_batch: Callable[[int, int], None] | None = None) -> Iterator[dict[str, Any]]:
        """`{"input", "prediction"[, "target"][, "scores"]}` per row, in order, batch by batch;
        `on_batch(done, total)` after each batch."""
        settings = settings or GenerationSettings()
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            for row, result in zip(chunk, self.predict_batch([row["input"] for row in chunk], settings, scores)):
                yield {"input": row["input"], **result, **({"target": row["target"]} if "target" in row else {})}
            if on_batch is not None:
                on_batch(min(start + batch_size, len(rows)), len(rows))
