"""Batch files: defaults, paths, and whole-batch validation that writes nothing when it fails.

The CLI tests here run `graftq submit` against a real redis-server and a real SQLite file,
and check that a rejected batch leaves no row and no message behind.
"""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.batch import deep_merge, load_batch
from jobs.cli import cli
from jobs.errors import SpecError


def write_batch(directory: Path, body: str, name: str = "batch.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


VALID = """
    batch: lora-vs-layer
    base_model: random:t5-tiny
    defaults:
      lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: [q, k, v, o]}
      layer: {stack: encoder, position: end, init_scale: 0.01}
      train: {dataset: data/reverse.jsonl, max_steps: 5, batch_size: 4}
    jobs:
      - {task: reverse, extension: lora}
      - {task: reverse, extension: layer, layer: {init_scale: 0}}
      - {task: reverse, extension: hybrid, lora: {r: 2}, train: {max_steps: 3}}
      - {task: stats-only, kind: create, extension: hybrid, base_model: random:flan-t5-small}
"""


def test_defaults_merge_into_every_job_and_job_keys_win(tmp_path, dataset):
    batch = load_batch(write_batch(tmp_path, VALID))
    assert batch.name == "lora-vs-layer" and len(batch.jobs) == 4
    lora, layer, hybrid, create = batch.jobs
    assert lora.lora.r == 8 and lora.layer is None and lora.train.max_steps == 5
    assert layer.layer.init_scale == 0 and layer.layer.stack == "encoder"
    assert hybrid.lora.r == 2 and hybrid.lora.alpha == 16 and hybrid.train.max_steps == 3
    assert hybrid.train.batch_size == 4  # the rest of the train section still comes from defaults
    assert create.base_model == "random:flan-t5-small" and create.train is None


def test_dataset_paths_are_resolved_against_the_batch_file(tmp_path, dataset, monkeypatch):
    path = write_batch(tmp_path, VALID)
    monkeypatch.chdir("/")
    batch = load_batch(path)
    assert {job.train.dataset for job in batch.jobs if job.train} == {str(dataset.resolve())}


def test_deep_merge_leaves_the_defaults_untouched():
    defaults = {"lora": {"r": 8, "alpha": 16}}
    merged = deep_merge(defaults, {"lora": {"r": 2}})
    assert merged == {"lora": {"r": 2, "alpha": 16}} and defaults == {"lora": {"r": 8, "alpha": 16}}


def _problems(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_batch(write_batch(tmp_path, body))
    return caught.value.problems


def test_every_problem_is_reported_at_once_naming_the_job_and_the_key(tmp_path, dataset):
    problems = _problems(tmp_path, """
        base_model: random:t5-tiny
        defaults:
          train: {dataset: data/reverse.jsonl}
        jobs:
          - {task: a, extension: lora, lora: {r: 0}}
          - {task: b, extension: lora, lora: {alpah: 4}}
          - {task: c, extension: layer, train: {max_steps: many}}
          - {task: d, extension: sideways}
    """)
    assert len(problems) == 4, problems
    assert problems[0].startswith("job 0 (task 'a'): key `lora.r`") and "greater than 0" in problems[0]
    assert problems[1].startswith("job 1 (task 'b'): key `lora.alpah`") and "did you mean `alpha`" in problems[1]
    assert problems[2].startswith("job 2 (task 'c'): key `train.max_steps`") and "'many'" in problems[2]
    assert problems[3].startswith("job 3 (task 'd'): key `extension`") and "lora" in problems[3]


def test_an_unknown_top_level_key_is_rejected_with_a_suggestion(tmp_path):
    [problem] = _problems(tmp_path, """
        base_model: random:t5-tiny
        default: {lora: {r: 4}}
        jobs: [{task: a, kind: create, extension: lora}]
    """)
    assert "key `default`" in problem and "did you mean `defaults`" in problem


def test_a_missing_dataset_names_the_file(tmp_path):
    [problem] = _problems(tmp_path, """
        base_model: random:t5-tiny
        jobs: [{task: a, extension: lora, train: {dataset: nowhere.jsonl}}]
    """)
    assert problem.startswith("job 0 (task 'a'): key `train.dataset`")
    assert str(tmp_path / "nowhere.jsonl") in problem and "does not exist" in problem


@pytest.mark.parametrize("content, suffix", [
    ('{"question": "abc", "answer": "cba"}\n', ".jsonl"),
    ("question,answer\nabc,cba\n", ".csv"),
])
def test_a_dataset_without_input_and_target_columns_is_rejected(tmp_path, content, suffix):
    (tmp_path / f"d{suffix}").write_text(content)
    [problem] = _problems(tmp_path, f"""
        base_model: random:t5-tiny
        jobs: [{{task: a, extension: lora, train: {{dataset: d{suffix}}}}}]
    """)
    assert "key `train.dataset`" in problem and "input" in problem and "question" in problem


@pytest.mark.parametrize("task", ["../x", "/etc/x", "a/../../b", "a\x00b", "x" * 500, "", "a b"])
def test_task_names_that_could_escape_the_artifacts_dir_are_rejected(tmp_path, task):
    from jobs.batch import parse_batch

    with pytest.raises(SpecError) as caught:
        parse_batch({"base_model": "random:t5-tiny", "jobs": [{"task": task, "kind": "create", "extension": "lora"}]})
    [problem] = caught.value.problems
    assert "key `task`" in problem and "letters, digits" in problem
    assert len(problem) < 400  # a 500-character name is shortened in the message


def test_bert_train_jobs_need_a_label_column(tmp_path, dataset):
    [problem] = _problems(tmp_path, """
        base_model: random:bert-tiny
        jobs: [{task: a, extension: lora, train: {dataset: data/reverse.jsonl}}]
    """)
    assert "job 0" in problem and "no column `label`" in problem


def test_yaml_syntax_errors_and_missing_files_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_batch(write_batch(tmp_path, "jobs: [unclosed\n"))
    with pytest.raises(SpecError, match="does not exist"):
        load_batch(tmp_path / "absent.yaml")


# --- through the CLI: nothing written anywhere --------------------------------------------------

INVALID_BATCHES = {
    "unknown key": "jobs: [{task: a, kind: create, extension: lora, colour: red}]",
    "wrong type": "jobs: [{task: a, kind: create, extension: lora, lora: {r: eight}}]",
    "r <= 0": "jobs: [{task: a, kind: create, extension: lora, lora: {r: -1}}]",
    "missing dataset": "jobs: [{task: a, extension: lora, train: {dataset: gone.jsonl}}]",
    "dataset without columns": "jobs: [{task: a, extension: lora, train: {dataset: cols.jsonl}}]",
    "bad task ../x": "jobs: [{task: ../x, kind: create, extension: lora}]",
    "bad task /etc/x": "jobs: [{task: /etc/x, kind: create, extension: lora}]",
    "bad task NUL": 'jobs: [{task: "a\\0b", kind: create, extension: lora}]',
    "bad task 500 chars": f"jobs: [{{task: {'y' * 500}, kind: create, extension: lora}}]",
}


@pytest.mark.parametrize("case", sorted(INVALID_BATCHES))
def test_an_invalid_batch_writes_no_row_and_no_message(case, tmp_path, sqlite_url, redis_url, redis_server):
    (tmp_path / "cols.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    good_job = "{task: fine, kind: create, extension: layer}"
    body = "base_model: random:t5-tiny\n" + INVALID_BATCHES[case].replace("jobs: [", f"jobs: [{good_job}, ")
    path = write_batch(tmp_path, body)
    database = tmp_path / "graftq.db"
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "--broker-url", redis_url, "submit", str(path)])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "job 1 (task" in result.output and "key `" in result.output, result.output
    assert "Traceback" not in result.output
    if database.exists():
        with sqlite3.connect(database) as connection:
            tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "jobs" in tables:
                assert connection.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
                assert connection.execute("SELECT count(*) FROM batches").fetchone() == (0,)
    assert redis_server.queue_lengths() == {"graftq": 0, "graftq.gpu": 0, "graftq.cpu": 0}
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_loading_a_batch_pauses_the_garbage_collector_and_restores_it(tmp_path):
    import gc

    from jobs.batch import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # only the outermost block turns it back on
    assert gc.isenabled()
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [{task: a, extension: nope}]\n")
    with pytest.raises(SpecError):
        load_batch(bad)
    assert gc.isenabled()  # also after an error
