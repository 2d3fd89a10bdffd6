"""`graftq results` with params: columns, `--where`, `--group-by`/`--agg`, on SQLite and PostgreSQL.

The rows are written straight through the query functions (no model needed): a grid of
task × lora.r × train.learning_rate × seed with known losses, plus a failed job and a job that
no matrix made. Every expected number is computed here by hand from the same rows.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import statistics

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from db.session import clear_cache, create_database_engine, get_database, upgrade_to_head
from db.submission import create_batch
from db.tables import RESULT_FIELDS, jobs
from jobs.cli import cli

TASKS = ("reverse", "upper")
RANKS = (4, 8)
RATES = (0.001, 0.0003)
SEEDS = (0, 1, 2)


def _loss(task: str, rank: int, rate: float, seed: int) -> float:
    return round(1.0 + TASKS.index(task) + 0.1 * rank * (rate * 1000) + 0.037 * seed * (seed + rank), 6)


def _record(url: str) -> list[dict]:
    """Write the grid (24 succeeded jobs, one of them without an eval_loss), one failed job and one
    plain job; returns what was written, one dict per job."""
    grid = [
        {"task": task, "params": {"lora.r": rank, "train.learning_rate": rate, "train.seed": seed},
         "eval_loss": _loss(task, rank, rate, seed), "train_seconds": 10.0 + seed + rank, "status": "succeeded",
         "name": "grid"}
        for task, rank, rate, seed in itertools.product(TASKS, RANKS, RATES, SEEDS)
    ]
    grid[5]["eval_loss"] = None  # a job that recorded no eval loss: aggregates skip it
    written = [
        *grid,
        {"task": "reverse", "params": {"lora.r": 8, "train.learning_rate": 0.001, "train.seed": 9},
         "eval_loss": None, "train_seconds": None, "status": "failed", "name": "grid"},
        {"task": "plain", "params": None, "eval_loss": 0.5, "train_seconds": 1.0, "status": "succeeded",
         "name": None},
    ]
    database = get_database(url)
    rows = [{"task": job["task"], "kind": "train", "extension": "lora", "base_model": "random:t5-tiny",
             "queue": "graftq", "spec": {"task": job["task"]}} for job in written]
    with database.begin() as connection:
        _, ids = create_batch(connection, "grid", rows)
        for job_id, job in zip(ids, written, strict=True):
            job["id"] = job_id
            connection.execute(update(jobs).where(jobs.c.id == job_id).values(
                status=job["status"], params=job["params"], name=job["name"], eval_loss=job["eval_loss"],
                train_seconds=job["train_seconds"]))
    return written


@pytest.fixture
def recorded(sqlite_url):
    written = _record(sqlite_url)
    yield sqlite_url, written
    clear_cache()


def _invoke(url: str, *args: str):
    result = CliRunner().invoke(cli, ["--database-url", url, "results", *args])
    assert result.exit_code == 0, result.output
    return result


def _json(url: str, *args: str):
    return json.loads(_invoke(url, *args, "--format", "json").stdout)


def _ids(url: str, *args: str) -> set[str]:
    return {row["id"] for row in _json(url, *args)}


def _error(url: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--database-url", url, "results", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


def test_json_gives_every_job_its_params_and_name(recorded):
    url, written = recorded
    rows = {row["id"]: row for row in _json(url)}
    assert all(list(row) == list(RESULT_FIELDS) for row in rows.values())
    for job in written:
        assert rows[job["id"]]["params"] == (job["params"] or {})
        assert rows[job["id"]]["name"] == job["name"]


def test_csv_has_one_column_per_params_key(recorded):
    url, written = recorded
    reader = csv.DictReader(io.StringIO(_invoke(url, "--format", "csv").stdout))
    assert reader.fieldnames == [f for f in RESULT_FIELDS if f not in ("params", "metrics")] + [
        "lora.r", "train.learning_rate", "train.seed"]
    by_id = {row["id"]: row for row in reader}
    first, plain = written[0], written[-1]
    assert by_id[first["id"]]["lora.r"] == "4" and by_id[first["id"]]["train.learning_rate"] == "0.001"
    assert by_id[plain["id"]]["lora.r"] == "" and by_id[plain["id"]]["name"] == ""


def test_the_table_shows_params_and_names_only_where_there_are_some(recorded):
    url, _ = recorded
    header = _invoke(url, "--limit", "100").stdout.splitlines()[0].split()
    assert header[:4] == ["id", "batch", "task", "name"]
    assert header[-3:] == ["lora.r", "train.learning_rate", "train.seed"]
    plain = _invoke(url, "--task", "plain").stdout.splitlines()[0].split()
    assert "name" not in plain and "lora.r" not in plain


@pytest.mark.parametrize(("condition", "expected"), [
    ("lora.r=8", lambda job: job["params"] and job["params"]["lora.r"] == 8),
    ("lora.r!=8", lambda job: job["params"] and job["params"]["lora.r"] != 8),
    ("train.learning_rate<0.001", lambda job: job["params"] and job["params"]["train.learning_rate"] < 0.001),
    ("train.learning_rate<=1e-3", lambda job: job["params"] and job["params"]["train.learning_rate"] <= 0.001),
    ("train.seed>1", lambda job: job["params"] and job["params"]["train.seed"] > 1),
    ("train.seed>=1", lambda job: job["params"] and job["params"]["train.seed"] >= 1),
    ("eval_loss<2", lambda job: job["eval_loss"] is not None and job["eval_loss"] < 2),
    ("eval_loss>=2.5", lambda job: job["eval_loss"] is not None and job["eval_loss"] >= 2.5),
    ("status!=failed", lambda job: job["status"] != "failed"),
    ("task=upper", lambda job: job["task"] == "upper"),
    ("task>plain", lambda job: job["task"] > "plain"),
    ("name=grid", lambda job: job["name"] == "grid"),
    ("batch=grid", lambda job: True),
    ("created_at>=2000-01-01", lambda job: True),
    ("created_at<2000-01-01T12:00", lambda job: False),
])
def test_where_keeps_the_jobs_a_hand_filter_keeps(recorded, condition, expected):
    url, written = recorded
    assert _ids(url, "--where", condition) == {job["id"] for job in written if expected(job)}


def test_where_conditions_add_up_and_apply_before_the_limit(recorded):
    url, written = recorded
    wanted = [job["id"] for job in written if job["params"] and job["params"]["lora.r"] == 8
              and job["params"]["train.seed"] == 2 and job["task"] == "upper"]
    assert _ids(url, "--where", "lora.r=8", "--where", "train.seed = 2", "--where", "task=upper") == set(wanted)
    # Sorted by eval_loss, the first three jobs with lora.r=8 (not the first three jobs, filtered).
    with_rank_8 = sorted((job for job in written if job["params"] and job["params"]["lora.r"] == 8
                          and job["eval_loss"] is not None), key=lambda job: job["eval_loss"])
    limited = _json(url, "--where", "lora.r=8", "--sort", "eval_loss", "--limit", "3")
    assert [row["id"] for row in limited] == [job["id"] for job in with_rank_8[:3]]
    assert len(_invoke(url, "--where", "lora.r=8").stdout.splitlines()) == 1 + 13  # the table too


def test_where_errors_name_the_option_and_the_fix(recorded):
    url, _ = recorded
    assert "--where" in (out := _error(url, "--where", "lora.r~8")) and "OP one of" in out
    assert "eval_loss is a number" in _error(url, "--where", "eval_loss<low")
    assert "unknown key 'colour'" in _error(url, "--where", "colour=red")
    assert "is not a status" in _error(url, "--where", "status=done")
    assert "not an ISO date" in _error(url, "--where", "created_at>yesterday")
    assert "no value" in _error(url, "--where", "lora.r=")
    typo = _invoke(url, "--where", "lora.rank=8")  # any dotted key is a params key; this one matches nothing
    assert "no job has the param 'lora.rank'" in typo.stderr and typo.stdout.strip() == "no matching jobs"


def _hand_groups(written, keys, field, statuses=("succeeded",)):
    groups: dict[tuple, list[float]] = {}
    for job in written:
        if job["status"] not in statuses or job["params"] is None:
            continue
        values = tuple(job["task"] if key == "task" else job["params"][key] for key in keys)
        groups.setdefault(values, [])
        if job[field] is not None:
            groups[values].append(job[field])
    return groups


def _check_grouped(url, written):
    rows = _json(url, "--group-by", "task,lora.r", "--agg", "eval_loss:mean,std,min,max,count",
                 "--agg", "train_seconds:mean", "--where", "task!=plain")
    expected = _hand_groups(written, ("task", "lora.r"), "eval_loss")
    seconds = _hand_groups(written, ("task", "lora.r"), "train_seconds")
    assert [(row["task"], row["lora.r"]) for row in rows] == sorted(expected)
    for row in rows:
        losses = expected[(row["task"], row["lora.r"])]
        assert list(row) == ["task", "lora.r", "eval_loss_mean", "eval_loss_std", "eval_loss_min", "eval_loss_max",
                             "eval_loss_count", "train_seconds_mean"]
        assert row["eval_loss_mean"] == pytest.approx(statistics.mean(losses), rel=1e-12)
        assert row["eval_loss_std"] == pytest.approx(statistics.stdev(losses), rel=1e-12)
        assert (row["eval_loss_min"], row["eval_loss_max"]) == (min(losses), max(losses))
        assert row["eval_loss_count"] == len(losses)
        assert row["train_seconds_mean"] == pytest.approx(statistics.mean(seconds[(row["task"], row["lora.r"])]))
    assert sum(row["eval_loss_count"] for row in rows) == 23  # 24 succeeded grid jobs, one without a loss


def test_grouped_numbers_equal_a_hand_computation(recorded):
    _check_grouped(*recorded)


@pytest.mark.postgres
def test_grouped_numbers_and_where_are_the_same_on_postgresql(postgres_database):
    engine = create_database_engine(postgres_database)
    upgrade_to_head(postgres_database, engine)
    engine.dispose()
    written = _record(postgres_database)
    _check_grouped(postgres_database, written)
    for condition, expected in [
        ("train.learning_rate<0.001", lambda job: job["params"] and job["params"]["train.learning_rate"] < 0.001),
        ("lora.r>=8", lambda job: job["params"] and job["params"]["lora.r"] >= 8),
        ("task>plain", lambda job: job["task"] > "plain"),
        ("eval_loss<2", lambda job: job["eval_loss"] is not None and job["eval_loss"] < 2),
        ("created_at>2000-01-01", lambda job: True),
        ("status!=failed", lambda job: job["status"] != "failed"),
    ]:
        assert _ids(postgres_database, "--where", condition) == {job["id"] for job in written if expected(job)}


def test_grouping_defaults_to_eval_loss_over_succeeded_jobs(recorded):
    url, written = recorded
    rows = _json(url, "--group-by", "train.seed")
    expected = _hand_groups(written, ("train.seed",), "eval_loss")
    assert [row["train.seed"] for row in rows] == [0, 1, 2, None]  # the plain job has no seed: last
    assert list(rows[0]) == ["train.seed", "eval_loss_mean", "eval_loss_std", "eval_loss_min", "eval_loss_count"]
    assert [row["eval_loss_count"] for row in rows[:3]] == [len(expected[(seed,)]) for seed in SEEDS]
    assert rows[3]["eval_loss_count"] == 1 and rows[3]["eval_loss_std"] is None  # one value: no std
    # The failed job (seed 9) counts only when asked for.
    everything = _json(url, "--group-by", "train.seed", "--status", "all")
    assert [row["train.seed"] for row in everything] == [0, 1, 2, 9, None]
    assert everything[3]["eval_loss_count"] == 0 and everything[3]["eval_loss_mean"] is None


def test_grouped_table_csv_and_sort(recorded):
    url, written = recorded
    table = _invoke(url, "--group-by", "task,extension", "--agg", "eval_loss:count").stdout.splitlines()
    assert table[0].split() == ["task", "extension", "eval_loss_count"]
    assert [line.split() for line in table[1:]] == [["plain", "lora", "1"], ["reverse", "lora", "11"],
                                                    ["upper", "lora", "12"]]
    rows = list(csv.reader(io.StringIO(_invoke(url, "--group-by", "lora.r", "--agg", "eval_loss:min",
                                               "--format", "csv").stdout)))
    assert rows[0] == ["lora.r", "eval_loss_min"] and [row[0] for row in rows[1:]] == ["4", "8", ""]
    best = _json(url, "--group-by", "task,lora.r,train.learning_rate", "--agg", "eval_loss:mean",
                 "--sort", "eval_loss_mean", "--limit", "2", "--where", "lora.r>0")
    means = sorted(statistics.mean(values) for values in
                   _hand_groups(written, ("task", "lora.r", "train.learning_rate"), "eval_loss").values())
    assert [row["eval_loss_mean"] for row in best] == pytest.approx(means[:2])
    worst = _json(url, "--group-by", "task", "--sort", "-eval_loss_mean")
    assert [row["task"] for row in worst] == ["upper", "reverse", "plain"]


def test_grouping_errors_name_the_option_and_the_fix(recorded):
    url, _ = recorded
    assert "not a numeric result field" in (out := _error(url, "--group-by", "task", "--agg", "task:mean"))
    assert "--agg" in out
    assert "unknown aggregate 'median'" in _error(url, "--group-by", "task", "--agg", "eval_loss:median")
    assert "FIELD:AGG" in _error(url, "--group-by", "task", "--agg", "eval_loss")
    assert "unknown key 'colour'" in _error(url, "--group-by", "task,colour")
    assert "eval_loss_mean" in _error(url, "--group-by", "task", "--sort", "train_loss")
    assert "give statuses" in _error(url, "--status", "done")
