"""Samples: a train job stores its first eval rows' input / target / prediction (the generations the
metrics scored, or the predicted labels) and `graftq show` prints them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.session import clear_cache
from jobs.cli import cli
from jobs.spec import JobSpec
from worker.data import read_training_rows
from worker.pipeline import JobContext, run_job
from worker.predict import GenerationSettings, Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(dataset: Path, preset: str = "t5-tiny", **train) -> JobSpec:
    return JobSpec.model_validate({
        "task": "reverse", "extension": "lora", "base_model": f"random:{preset}", "device": "cpu",
        "train": {"dataset": str(dataset), "max_steps": 2, "batch_size": 8, "eval_fraction": 0.25,
                  "checkpoint_every": 0, **train}})


def test_graftq_run_stores_samples_equal_to_predict_and_show_prints_them(dataset, tmp_path):
    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    batch = tmp_path / "batch.yaml"
    batch.write_text(f"""
batch: samples
jobs:
  - task: reverse
    extension: lora
    base_model: random:t5-tiny
    device: cpu
    train: {{dataset: {dataset}, max_steps: 2, eval_fraction: 0.25, checkpoint_every: 0,
            metrics: [exact_match], max_new_tokens: 6, num_samples: 3}}
""")
    runner = CliRunner()
    try:
        result = runner.invoke(cli, ["--database-url", url, "--artifacts-dir", str(tmp_path / "artifacts"),
                                     "run", str(batch)])
        assert result.exit_code == 0, result.output
        rows = json.loads(runner.invoke(cli, ["--database-url", url, "results", "--format", "json"]).stdout)
        assert "samples" not in rows[0]
        job_id = rows[0]["id"]
        shown = runner.invoke(cli, ["--database-url", url, "show", job_id, "--format", "json"])
        assert shown.exit_code == 0, shown.output
        record = json.loads(shown.stdout)
        text = runner.invoke(cli, ["--database-url", url, "show", job_id])
        assert text.exit_code == 0, text.output
    finally:
        clear_cache()

    spec = JobSpec.model_validate(record["spec"])
    _, eval_rows = read_training_rows(spec.train)
    assert len(eval_rows) > 3
    first = eval_rows[:3]
    predictor = Predictor.from_job_dir(record["job_dir"], device="cpu")
    predictions = [line["prediction"] for line in predictor.predict(
        [{"input": row["input"]} for row in first], GenerationSettings(max_new_tokens=6), batch_size=8)]
    expected = [{"input": row["input"], "target": row["target"], "prediction": prediction}
                for row, prediction in zip(first, predictions, strict=True)]
    assert record["samples"] == expected
    assert json.loads((Path(record["job_dir"]) / "job.json").read_text())["samples"] == expected

    block = text.stdout.split("samples:\n", 1)[1].splitlines()[:9]
    for index, sample in enumerate(expected):
        assert block[3 * index].split(None, 1) == ["input", sample["input"]]
        assert block[3 * index + 1].split(None, 1) == ["target", sample["target"]]
        assert block[3 * index + 2].split() == ["prediction", *sample["prediction"].split()]


def test_show_cuts_a_long_sample():
    from jobs.cli import _cut

    assert _cut("ab") == "ab"
    cut = _cut("q" * 300)
    assert len(cut) == 200 and cut.endswith("…")
    assert _cut("a\nb") == "a b"


def test_no_samples_when_none_are_asked_and_only_the_samples_generated_without_metrics(dataset, tmp_path,
                                                                                     monkeypatch):
    outcome = run_job(JobContext(job_id="none", batch_id="batch", artifacts_root=tmp_path,
                                 spec=_spec(dataset, num_samples=0, max_new_tokens=4)))
    assert outcome.samples is None
    assert json.loads((Path(outcome.job_dir) / "job.json").read_text())["samples"] == []

    generated: list[int] = []
    predict = Predictor.predict

    def counting(self, rows, settings, batch_size=8):
        rows = list(rows)
        generated.append(len(rows))
        return predict(self, rows, settings, batch_size=batch_size)

    monkeypatch.setattr(Predictor, "predict", counting)
    outcome = run_job(JobContext(job_id="two", batch_id="batch", artifacts_root=tmp_path,
                                 spec=_spec(dataset, num_samples=2, metrics=[], max_new_tokens=4)))
    assert outcome.task_metrics == {}
    assert generated == [2]
    assert [sample["input"] for sample in outcome.samples] == [
        row["input"] for row in read_training_rows(_spec(dataset).train)[1][:2]]


def test_a_classification_job_stores_true_and_predicted_labels(tmp_path):
    path = tmp_path / "toy.jsonl"
    rows = [{"input": f"word{index}", "label": "odd" if index % 2 else "even"} for index in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = _spec(path, "bert-tiny", num_samples=20)
    outcome = run_job(JobContext(job_id="cls", batch_id="batch", spec=spec, artifacts_root=tmp_path))
    _, eval_rows = read_training_rows(spec.train)
    assert len(eval_rows) == 10  # fewer eval rows than num_samples: all of them
    assert [(s["input"], s["target"]) for s in outcome.samples] == [(r["input"], r["label"]) for r in eval_rows]
    assert all(sample["prediction"] in ("even", "odd") for sample in outcome.samples)
    # without metrics only the samples' rows are classified
    outcome = run_job(JobContext(job_id="cls-3", batch_id="batch", artifacts_root=tmp_path,
                                 spec=_spec(path, "bert-tiny", num_samples=3, metrics=[])))
    assert outcome.task_metrics == {}
    assert [(s["input"], s["target"]) for s in outcome.samples] == [(r["input"], r["label"]) for r in eval_rows[:3]]
