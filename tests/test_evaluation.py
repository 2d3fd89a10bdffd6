"""Evaluation during training: the early-stopping rule on crafted curves, `keep: best` saving the best
step's weights, the best state surviving a SIGKILL of the training process, separate and named
evaluation sets stored and shown, and the validation errors of the new keys."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from db.session import clear_cache
from jobs.batch import load_batch, parse_batch
from jobs.cli import cli
from jobs.errors import SpecError
from jobs.spec import JobSpec, TrainSpec
from worker.evaluation import BestTracker, tracker_for

WORDS = ["abc", "xyz", "cat", "dog", "sun", "map", "red", "fox", "owl", "bee", "ink", "jar"]
EVAL_WORDS = ["elk", "gnu", "yak", "emu"]
# Higher eval loss counts as better here: training lowers it step after step, so the first
# evaluation (step 2) is the best and every later one is worse, on any machine.
FIRST_IS_BEST = {"metric": "eval_loss", "mode": "max"}


def _rows(words: list[str]) -> str:
    return "".join(json.dumps({"input": w, "target": w[::-1]}) + "\n" for w in words)


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    paths = {"train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl", "other": tmp_path / "other.jsonl"}
    paths["train"].write_text(_rows(WORDS * 2))
    paths["eval"].write_text(_rows(EVAL_WORDS))
    paths["other"].write_text(_rows(WORDS[:4]))
    return paths


def _stop(tracker: BestTracker, values: list[float]) -> tuple[int | None, int | None]:
    """(the step early stopping stops at, or None; the best step), feeding values at steps 1, 2, ..."""
    for step, value in enumerate(values, 1):
        tracker.update(step, value)
        if tracker.should_stop:
            return step, tracker.best_step
    return None, tracker.best_step


@pytest.mark.parametrize(("maximize", "patience", "min_delta", "values", "expected"), [
    # min: best 4.0 at step 2; two evaluations without improvement stop at step 4
    (False, 2, 0.0, [5.0, 4.0, 4.5, 4.2, 3.9], (4, 2)),
    # an improvement resets the count: 3.9 at step 4 is new, then 3 bad ones with patience 3
    (False, 3, 0.0, [5.0, 4.0, 4.5, 3.9, 4.0, 4.1, 3.95, 1.0], (7, 4)),
    # min_delta: small gains still become the best, but do not reset the patience count
    (False, 2, 0.1, [5.0, 4.95, 4.9, 4.85], (3, 3)),
    # max (exact match): 0.3 at step 2 stays best; a tie is no improvement
    (True, 2, 0.0, [0.1, 0.3, 0.3, 0.2, 0.9], (4, 2)),
    # no patience: never stops, keeps the best
    (True, None, 0.0, [0.1, 0.5, 0.2, 0.1], (None, 2)),
])
def test_early_stopping_rule_on_crafted_curves(maximize, patience, min_delta, values, expected):
    assert _stop(BestTracker("m", maximize, patience, min_delta), values) == expected


def test_the_watched_metric_and_its_direction_come_from_the_spec():
    def train(**keys) -> TrainSpec:
        return TrainSpec.model_validate({"dataset": "x.jsonl", "eval_every": 5, **keys})

    default = tracker_for(train())
    assert (default.metric, default.maximize, default.patience) == ("eval_loss", False, None)
    exact = tracker_for(train(early_stopping={"metric": "exact_match"}))
    assert (exact.metric, exact.maximize, exact.patience) == ("exact_match", True, 3)
    assert tracker_for(train(early_stopping={"metric": "eval_loss", "mode": "max"})).maximize
    assert train().keep_best and not train(keep="last").keep_best
    assert not TrainSpec.model_validate({"dataset": "x.jsonl"}).keep_best


def _batch(data: dict[str, Path], job: str, defaults: str = "") -> dict:
    import yaml

    text = textwrap.dedent(f"""\
        batch: evaluation
        base_model: random:t5-tiny
        defaults:
          device: cpu
          lora: {{dropout: 0}}
          train: {{dataset: {data['train']}, batch_size: 4, checkpoint_every: 0, max_new_tokens: 4 {defaults}}}
        jobs:
          - {job}
        """)
    return yaml.safe_load(text)


@pytest.mark.parametrize(("job", "defaults", "message"), [
    ("{task: t, extension: lora, train: {early_stopping: {metric: eval_loss}}}", "",
     "train.early_stopping: needs periodic evaluation; set train.eval_every"),
    ("{task: t, extension: lora, train: {keep: best}}", "", "train.keep: needs periodic evaluation"),
    ("{task: t, extension: lora, train: {eval_every: 2, eval_fraction: 0}}", "",
     "train.eval_every: there is nothing to evaluate with eval_fraction: 0"),
    ("{task: t, extension: lora, train: {eval_every: 2, early_stopping: {metric: bleu}}}", "",
     "train.early_stopping.metric: 'bleu' is not computed by this job; use one of eval_loss, exact_match"),
    ("{task: t, extension: lora, train: {eval_every: 2, early_stopping: {mode: up}}}", "",
     "key `train.early_stopping.mode`"),
    ("{task: t, extension: lora, train: {eval_every: 2, early_stopping: {patience: 0}}}", "",
     "key `train.early_stopping.patience`"),
    ("{task: t, extension: lora, train: {eval_every: 2, early_stopping: {metrik: exact_match}}}", "",
     "key `train.early_stopping.metrik`: unknown key; remove it or fix its spelling (did you mean `metric`?)"),
    ("{task: t, extension: lora, train: {eval_dataset: missing.jsonl}}", "",
     "key `train.eval_dataset`: dataset"),
    ("{task: t, extension: lora, eval: {datasets: {a: nowhere.jsonl}}}", "", "key `eval.datasets.a`: dataset"),
    ("{task: t, extension: lora, eval: {datasets: {'a b': x.jsonl}}}", "", "evaluation set name 'a b'"),
])
def test_validation_errors_name_the_job_and_the_key(data, job, defaults, message, tmp_path):
    with pytest.raises(SpecError) as raised:
        parse_batch(_batch(data, job, defaults), tmp_path / "batch.yaml")
    text = str(raised.value)
    assert "job 0 (task 't')" in text and message in text, text


def _adapter(job_dir: str | Path) -> dict:
    return load_file(str(Path(job_dir) / "adapter" / "adapter_model.safetensors"))


@pytest.mark.usefixtures("one_torch_thread")
def test_keep_best_saves_the_best_steps_weights_and_eval_sets_are_stored_and_shown(data, tmp_path):
    from worker.pipeline import JobContext, run_job

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    batch = tmp_path / "batch.yaml"
    early = json.dumps({**FIRST_IS_BEST, "patience": 2})
    batch.write_text(textwrap.dedent(f"""\
        batch: evaluation
        base_model: random:t5-tiny
        jobs:
          - task: reverse
            extension: lora
            device: cpu
            lora: {{dropout: 0}}
            train: {{dataset: train.jsonl, eval_dataset: eval.jsonl, max_steps: 20, eval_every: 2, batch_size: 4,
                     early_stopping: {early}, checkpoint_every: 0, max_new_tokens: 4}}
            eval: {{datasets: {{other: other.jsonl, again: eval.jsonl}}}}
        """))
    runner = CliRunner()
    base = ["--database-url", url, "--artifacts-dir", str(tmp_path / "artifacts")]
    try:
        ran = runner.invoke(cli, [*base, "run", str(batch)])
        assert ran.exit_code == 0, ran.output
        [row] = json.loads(runner.invoke(cli, [*base, "results", "--format", "json"]).stdout)
        shown = runner.invoke(cli, [*base, "show", row["id"]])
        record = json.loads(runner.invoke(cli, [*base, "show", row["id"], "--format", "json"]).stdout)
        pytest.importorskip("matplotlib")
        page = tmp_path / "report.html"
        reported = runner.invoke(cli, [*base, "report", "--out", str(page)])
        assert reported.exit_code == 0, reported.output
    finally:
        clear_cache()

    # Evaluations at 2 (the best), 4, 6: patience 2 stops training at step 6; step 2's weights are kept.
    assert (row["best_step"], row["best_metric"], row["steps"]) == (2, "eval_loss", 6)
    eval_points = {step: loss for step, split, loss in
                   ((p["step"], p["split"], p["loss"]) for p in record["loss_curve"]) if split == "eval"}
    assert sorted(eval_points) == [0, 2, 4, 6]
    assert row["best_value"] == eval_points[2] == row["eval_loss"]
    assert sorted(record["metric_curve"]) == ["char_accuracy", "exact_match"]
    assert [p["step"] for p in record["metric_curve"]["exact_match"]] == [0, 2, 4, 6]
    # The separate eval file is the eval split (its rows are the samples), and each named set is scored
    # on the kept weights: `again` is the same file, so the same loss as step 2's.
    assert [s["input"] for s in record["samples"]] == EVAL_WORDS
    assert sorted(row["eval_sets"]) == ["again", "other"]
    assert set(row["eval_sets"]["other"]) == {"eval_loss", "exact_match", "char_accuracy"}
    assert row["eval_sets"]["again"]["eval_loss"] == pytest.approx(eval_points[2], rel=1e-5)
    assert shown.exit_code == 0, shown.output
    for line in ("best_step          2", "best_metric        eval_loss", "eval sets:", "  again", "  other",
                 "metric curves:", "  exact_match: 0="):
        assert line in shown.stdout, shown.stdout
    assert 'data-chart="metric curves reverse lora exact_match"' in page.read_text()

    # The same job trained for 2 steps and kept as it ends has the same weights, tensor for tensor.
    spec = JobSpec.model_validate({**record["spec"], "eval": None, "train": {
        **record["spec"]["train"], "max_steps": 2, "eval_every": None, "early_stopping": None, "keep": None}})
    two_steps = run_job(JobContext(job_id="0" * 16, batch_id="1" * 16, spec=spec, artifacts_root=tmp_path / "two"))
    assert two_steps.metrics.get("best_step") is None
    kept, reference = _adapter(record["job_dir"]), _adapter(two_steps.job_dir)
    assert kept.keys() == reference.keys() and kept
    for name, tensor in reference.items():
        assert kept[name].equal(tensor), name


def _train_until_paused(spec: JobSpec, artifacts: Path, checkpoint: Path) -> None:
    """The job in a forked child, which stops after the checkpoint of step 4 (the test kills it there)."""
    from worker.pipeline import JobContext, run_job

    def report(progress) -> None:
        if progress.phase == "train" and progress.step >= 5:
            time.sleep(600)

    run_job(JobContext(job_id="a" * 16, batch_id="b" * 16, spec=spec, artifacts_root=artifacts,
                       checkpoint_dir=checkpoint, on_progress=report, progress_interval=0))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_job_killed_after_its_best_step_still_keeps_that_best_when_resumed(data, tmp_path):
    from worker.pipeline import JobContext, run_job

    spec = JobSpec.model_validate({
        "task": "reverse", "extension": "lora", "base_model": "random:t5-tiny", "device": "cpu",
        "lora": {"dropout": 0},
        "train": {"dataset": str(data["train"]), "eval_dataset": str(data["eval"]), "max_steps": 8, "eval_every": 2,
                  "batch_size": 4, "checkpoint_every": 1, "early_stopping": {**FIRST_IS_BEST, "patience": 10},
                  "metrics": [], "num_samples": 0}})
    artifacts, checkpoint = tmp_path / "artifacts", tmp_path / "checkpoint"
    # forked: the child starts with torch imported; SIGKILL ends it as a crash or the OOM killer would
    process = multiprocessing.get_context("fork").Process(target=_train_until_paused,
                                                          args=(spec, artifacts, checkpoint))
    process.start()
    state_file = checkpoint / "trainer_state.json"
    deadline = time.monotonic() + 120
    try:
        while not (state_file.exists() and json.loads(state_file.read_text())["step"] >= 4):
            assert process.is_alive(), f"the training process ended ({process.exitcode})"
            assert time.monotonic() < deadline, "no checkpoint of step 4 within 120 s"
            time.sleep(0.1)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
    assert process.exitcode == -signal.SIGKILL
    state = json.loads(state_file.read_text())
    assert state["step"] == 4 and state["evaluation"]["tracker"]["best_step"] == 2
    best_at_step_2 = load_file(str(checkpoint / "best.safetensors"))

    outcome = run_job(JobContext(job_id="a" * 16, batch_id="b" * 16, spec=spec, artifacts_root=artifacts,
                                 checkpoint_dir=checkpoint))
    info = json.loads((Path(outcome.job_dir) / "job.json").read_text())
    assert info["metrics"]["resumed_from_step"] == 4 and outcome.metrics["steps"] == 8
    assert outcome.metrics["best_step"] == 2
    assert [step for step, split, _ in outcome.loss_curve if split == "eval"] == [0, 2, 4, 6, 8]
    saved = _adapter(outcome.job_dir)
    assert saved and all(saved[name].equal(best_at_step_2[name.replace(".weight", ".task_reverse.weight")])
                         for name in saved)


def test_the_readme_example_is_a_valid_batch():
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("### Evaluation during training", 1)[1]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    # its paths are the example data's, as written next to examples/
    batch = parse_batch({"batch": "readme", "base_model": "random:t5-tiny", **example,
                         "jobs": [{"task": "reverse", "extension": "lora"}]}, root / "examples" / "batch.yaml")
    train = batch.jobs[0].train
    assert (train.eval_every, train.early_stopping.metric, train.early_stopping.maximize, train.keep_best) == (
        50, "exact_match", True, True)
    assert list(batch.jobs[0].eval.datasets) == ["uppercase"]
    # the forgetting measurement of the shared-layer example: uppercase before and after the block moved
    shared = load_batch(root / "examples" / "shared_layer.yaml")
    assert [job.task for job in shared.jobs if job.eval is not None] == ["all-tasks", "reverse"]
