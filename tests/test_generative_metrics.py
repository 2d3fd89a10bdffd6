"""Generative task metrics: the metric functions on hand-checked cases, and train jobs on tiny
seq2seq and decoder-only models that score greedy generations of the eval split."""

from __future__ import annotations

import pytest

from jobs.errors import SpecError
from jobs.metrics import DEFAULT_METRICS, check_metrics
from jobs.spec import JobSpec
from worker.data import read_training_rows
from worker.metrics import bleu, char_accuracy, compute, exact_match, rouge_l, token_accuracy
from worker.pipeline import JobContext, run_job
from worker.predict import GenerationSettings, Predictor
from worker.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_metrics_on_hand_checked_cases():
    assert exact_match([" abc\n", "abc"], ["abc", "abd"]) == 0.5
    assert char_accuracy(["abc"], ["abd"]) == pytest.approx(2 / 3)
    # over the longer one: 2 of 4 positions; an empty pair is a perfect match
    assert char_accuracy(["ab", ""], ["abcd", ""]) == pytest.approx((0.5 + 1.0) / 2)
    assert char_accuracy(["xbc"], ["abc"]) == pytest.approx(2 / 3)
    # the byte tokenizer has one token per byte: "é" is two tokens, and both differ from "e"'s one
    assert token_accuracy(["abé"], ["abe"], ByteTokenizer()) == pytest.approx(2 / 4)
    assert token_accuracy(["abc"], ["abc"], ByteTokenizer()) == 1.0
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["aaa bbb ccc ddd"], ["www xxx yyy zzz"]) == pytest.approx(0.0)
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    assert rouge_l(["alpha beta gamma"], ["alpha beta gamma"]) == pytest.approx(1.0)
    # LCS "a c" of 2 words: precision 2/3, recall 2/2 -> F 0.8
    assert rouge_l(["a b c"], ["a c"]) == pytest.approx(0.8)
    assert compute(["exact_match", "token_accuracy"], ["ab"], ["ab"], tokenizer=ByteTokenizer()) == {
        "exact_match": 1.0, "token_accuracy": 1.0}
    assert compute(["bleu"], [], []) == {}


def test_registry_defaults_and_validation():
    assert DEFAULT_METRICS["seq2seq"] == DEFAULT_METRICS["causal"] == ("exact_match", "char_accuracy")
    assert check_metrics(None, "causal") == ["exact_match", "char_accuracy"]
    assert check_metrics(["bleu", "rouge_l"], "seq2seq") == ["bleu", "rouge_l"]
    with pytest.raises(ValueError, match="does not apply to the classification objective"):
        check_metrics(["bleu"], "classification")
    with pytest.raises(ValueError, match="does not apply to the seq2seq objective"):
        check_metrics(["accuracy"], "seq2seq")
    with pytest.raises((SpecError, ValueError), match="max_new_tokens"):
        JobSpec.model_validate({"task": "t", "extension": "lora", "base_model": "random:t5-tiny",
                                "train": {"dataset": "d.jsonl", "max_new_tokens": 0}})


def _spec(dataset, preset: str, **train) -> JobSpec:
    return JobSpec.model_validate({
        "task": "reverse", "extension": "lora", "base_model": f"random:{preset}", "device": "cpu",
        "train": {"dataset": str(dataset), "max_steps": 2, "batch_size": 8, "eval_fraction": 0.25,
                  "checkpoint_every": 0, **train}})


@pytest.mark.parametrize("preset", ["t5-tiny", "gpt2-tiny"])
def test_a_train_job_records_generative_metrics_equal_to_predict(dataset, tmp_path, preset, monkeypatch):
    import worker.metrics

    scored: list[tuple[list, list]] = []

    def recording_compute(names, predictions, references, tokenizer=None):
        scored.append((list(predictions), list(references)))
        return compute(names, predictions, references, tokenizer)

    monkeypatch.setattr(worker.metrics, "compute", recording_compute)
    spec = _spec(dataset, preset, metrics=["exact_match", "char_accuracy", "token_accuracy", "bleu", "rouge_l"],
                 max_new_tokens=6)
    outcome = run_job(JobContext(job_id="job", batch_id="batch", spec=spec, artifacts_root=tmp_path))
    metrics = outcome.task_metrics
    assert set(metrics) == {"exact_match", "char_accuracy", "token_accuracy", "bleu", "rouge_l"}
    for name in ("exact_match", "char_accuracy", "token_accuracy", "rouge_l"):
        assert 0.0 <= metrics[name] <= 1.0
    assert 0.0 <= metrics["bleu"] <= 100.0

    # the metrics scored graftq predict's generations of the eval inputs
    _, eval_rows = read_training_rows(spec.train)
    predictor = Predictor.from_job_dir(outcome.job_dir, device="cpu")
    assert predictor.max_new_tokens == 6
    lines = list(predictor.predict([{"input": row["input"]} for row in eval_rows],
                                   GenerationSettings(max_new_tokens=6), batch_size=8))
    predictions = [line["prediction"] for line in lines]
    references = [row["target"] for row in eval_rows]
    assert scored == [(predictions, references)]
    assert compute(list(metrics), predictions, references, tokenizer=predictor.tokenizer) == pytest.approx(metrics)


def test_default_metrics_and_no_eval_split(dataset, tmp_path):
    outcome = run_job(JobContext(job_id="a", batch_id="batch", spec=_spec(dataset, "t5-tiny"),
                                 artifacts_root=tmp_path))
    assert set(outcome.task_metrics) == {"exact_match", "char_accuracy"}
    assert all(0.0 <= value <= 1.0 for value in outcome.task_metrics.values())
    outcome = run_job(JobContext(job_id="b", batch_id="batch", spec=_spec(dataset, "t5-tiny", eval_fraction=0),
                                 artifacts_root=tmp_path))
    assert outcome.task_metrics == {}


def test_graftq_run_records_and_sorts_by_generative_metrics(dataset, tmp_path):
    import json

    from click.testing import CliRunner

    from db.session import clear_cache
    from jobs.cli import cli

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    batch = tmp_path / "batch.yaml"
    batch.write_text(f"""
batch: gen
matrix:
  train.seed: [0, 1]
jobs:
  - task: reverse
    extension: lora
    base_model: random:gpt2-tiny
    device: cpu
    train: {{dataset: {dataset}, max_steps: 2, eval_fraction: 0.25, checkpoint_every: 0,
            metrics: [exact_match, bleu]}}
""")
    runner = CliRunner()
    try:
        result = runner.invoke(cli, ["--database-url", url, "--artifacts-dir", str(tmp_path / "artifacts"),
                                     "run", str(batch)])
        assert result.exit_code == 0, result.output
        result = runner.invoke(cli, ["--database-url", url, "results", "--sort", "-metric.bleu", "--format", "json"])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert [set(row["metrics"]) for row in rows] == [{"exact_match", "bleu"}] * 2
        assert rows[0]["metrics"]["bleu"] >= rows[1]["metrics"]["bleu"]
        result = runner.invoke(cli, ["--database-url", url, "show", rows[0]["id"]])
        assert "task metrics:" in result.output and "exact_match" in result.output
    finally:
        clear_cache()
