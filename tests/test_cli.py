"""The `graftq` CLI: help, submit (real Redis), results/show/status/cancel, import hygiene."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import textwrap

import pytest
from click.testing import CliRunner

from db.session import clear_cache, get_database
from db.tables import RESULT_FIELDS
from jobs.cli import cli, iter_commands
from tests.conftest import ROOT, free_port, graftq_argv
from tests.redis_server import queued_messages

BATCH = """
    batch: cli-test
    base_model: random:t5-tiny
    defaults:
      train: {dataset: data/reverse.jsonl, max_steps: 2, batch_size: 4}
    jobs:
      - {task: reverse, extension: lora}
      - {task: reverse, extension: layer, device: cpu}
      - {task: reverse, extension: hybrid, device: "cuda:0"}
      - {task: stats, kind: create, extension: hybrid}
"""


@pytest.fixture
def batch_file(tmp_path, dataset):
    path = tmp_path / "batch.yaml"
    path.write_text(textwrap.dedent(BATCH))
    return path


@pytest.fixture
def invoke(sqlite_url, artifacts_dir):
    runner = CliRunner()

    def run(*args: str, broker: str | None = None):
        options = ["--database-url", sqlite_url, "--artifacts-dir", str(artifacts_dir)]
        if broker:
            options += ["--broker-url", broker]
        return runner.invoke(cli, [*options, *args], catch_exceptions=False)

    yield run
    clear_cache()


@pytest.mark.parametrize("path", [(), *iter_commands()], ids=lambda p: " ".join(p) or "graftq")
def test_every_command_has_help(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and "--help" in result.output


def test_submit_help_keys_describes_the_batch_file(invoke):
    result = invoke("submit", "--help-keys")
    assert result.exit_code == 0
    for key in ("task", "extension", "target_modules", "init_scale", "max_steps", "eval_fraction"):
        assert key in result.output


def test_submit_records_queued_jobs_and_routes_them_by_device(invoke, batch_file, redis_url, redis_server, sqlite_url):
    result = invoke("submit", str(batch_file), broker=redis_url)
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip().splitlines()[-1]
    assert len(batch_id) == 16
    # auto -> graftq, cpu -> graftq.cpu, cuda:0 -> graftq.gpu (a CPU-only worker never takes it)
    assert redis_server.queue_lengths() == {"graftq": 2, "graftq.gpu": 1, "graftq.cpu": 1}
    [message] = [json.loads(raw) for raw in queued_messages(redis_server.client(), "graftq.gpu")]
    assert message["content-type"] == "application/json" and message["headers"]["task"] == "graftq.run_job"
    database = get_database(sqlite_url)
    from db.queries import jobs_of_batch

    with database.read() as session:
        jobs = jobs_of_batch(session, batch_id)
        assert [j.status for j in jobs] == ["queued"] * 4
        assert all(j.published_at is not None for j in jobs)
        assert [j.queue for j in jobs] == ["graftq", "graftq.cpu", "graftq.gpu", "graftq"]
        body = json.loads(base64.b64decode(message["body"]))  # kombu's Redis transport base64-encodes bodies
        assert body[0] == [jobs[2].id]  # the message carries only the job id

    status = invoke("status", batch_id)
    assert status.exit_code == 0 and "cli-test" in status.output and "4" in status.output

    cancelled = invoke("cancel", jobs[0].id, jobs[1].id[:8])
    assert cancelled.exit_code == 0
    assert f"{jobs[0].id}: cancelled" in cancelled.output and f"{jobs[1].id}: cancelled" in cancelled.output
    rest = invoke("cancel", "--batch", batch_id)
    assert "2 cancelled" in rest.output and "2 already cancelled" in rest.output
    rows = json.loads(invoke("results", "--batch", "cli-test", "--format", "json").output)
    assert {row["status"] for row in rows} == {"cancelled"}


def test_submit_with_the_broker_down_fails_clearly_and_records_nothing(invoke, batch_file, tmp_path):
    down = f"redis://127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{tmp_path / 'g.db'}", "--broker-url", down,
                                      "submit", str(batch_file)])
    assert result.exit_code == 1
    assert "cannot reach the broker" in result.output and "Nothing was recorded" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "g.db").exists()  # checked before the database was even opened


def test_dry_run_prints_the_expanded_jobs_and_writes_nothing(batch_file, tmp_path, dataset):
    url = f"sqlite:///{tmp_path / 'never.db'}"
    result = CliRunner().invoke(cli, ["--database-url", url, "--broker-url", "redis://127.0.0.1:1/0",
                                      "submit", "--dry-run", str(batch_file)])
    assert result.exit_code == 0, result.output
    assert "4 jobs" in result.output and "graftq.gpu" in result.output.split()
    assert str(dataset.resolve()) in result.output  # paths are shown resolved
    assert not (tmp_path / "never.db").exists()


def _finished_batch(sqlite_url):
    """A batch recorded straight through the query functions (no model needed): 3 jobs."""
    from db.claims import claim_job, fail_job, finish_job
    from db.submission import create_batch

    database = get_database(sqlite_url)
    rows = [{"task": t, "kind": "train", "extension": e, "base_model": "random:t5-tiny", "queue": "graftq",
             "spec": {"task": t}} for t, e in (("a", "lora"), ("b", "layer"), ("c", "hybrid"))]
    with database.begin() as session:
        batch_id, ids = create_batch(session, "finished", rows)
        for job_id, loss in zip(ids[:2], (2.0, 1.0)):
            token = claim_job(session, job_id, "w", 60).token
            finish_job(session, job_id, token, stats={"base_params": 100, "trainable_params": 10,
                                                      "trainable_pct": 10.0},
                       metrics={"train_loss": loss, "steps": 2}, device="cpu", dtype="float32",
                       versions={"torch": "2"}, job_dir=f"/art/{job_id}", adapter_path=f"/art/{job_id}/adapter",
                       loss_curve=[(1, "train", loss + 1), (2, "train", loss)])
        token = claim_job(session, ids[2], "w", 60).token
        fail_job(session, ids[2], token, "ConfigError: unknown target module 'qq'", "Traceback...\nConfigError")
    return batch_id, ids


def test_results_json_has_the_documented_keys_and_sorts(invoke, sqlite_url):
    batch_id, ids = _finished_batch(sqlite_url)
    rows = json.loads(invoke("results", "--format", "json", "--sort", "train_loss").output)
    assert [list(row) for row in rows] == [list(RESULT_FIELDS)] * 3
    assert [row["id"] for row in rows] == [ids[1], ids[0], ids[2]]  # 1.0, 2.0, then the failed job (null)
    assert rows[0]["batch"] == "finished" and rows[0]["batch_id"] == batch_id
    assert rows[2]["error"].startswith("ConfigError") and rows[2]["train_loss"] is None
    assert rows[0]["created_at"].endswith("+00:00")
    newest_first = json.loads(invoke("results", "--format", "json", "--sort", "-train_loss", "--limit", "1").output)
    assert [row["id"] for row in newest_first] == [ids[0]]
    only_failed = json.loads(invoke("results", "--format", "json", "--status", "failed").output)
    assert [row["id"] for row in only_failed] == [ids[2]]


def test_results_csv_has_the_same_columns(invoke, sqlite_url):
    _finished_batch(sqlite_url)
    output = invoke("results", "--format", "csv", "--extension", "lora").output
    reader = csv.DictReader(io.StringIO(output))
    # no job has params or task metrics: no column of theirs
    assert reader.fieldnames == [field for field in RESULT_FIELDS if field not in ("params", "metrics")]
    [row] = list(reader)
    assert row["extension"] == "lora" and row["train_loss"] == "2.0" and row["layer_path"] == ""


def test_results_table_and_bad_options(invoke, sqlite_url):
    _finished_batch(sqlite_url)
    table = invoke("results")
    assert table.exit_code == 0 and "succeeded" in table.output and "failed" in table.output
    bad = CliRunner().invoke(cli, ["--database-url", sqlite_url, "results", "--sort", "colour"])
    assert bad.exit_code == 2 and "cannot sort by 'colour'" in bad.output
    assert "Traceback" not in bad.output


def _many_jobs(sqlite_url, count):
    """`count` jobs in one batch, created one second apart (the last is the newest)."""
    import datetime as dt

    from sqlalchemy import update

    from db.submission import create_batch
    from db.tables import jobs

    rows = [{"task": f"t{i}", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny",
             "queue": "graftq", "spec": {}} for i in range(count)]
    with get_database(sqlite_url).begin() as session:
        _, ids = create_batch(session, "many", rows)
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        for index, job_id in enumerate(ids):
            session.execute(update(jobs).where(jobs.c.id == job_id).values(created_at=start + dt.timedelta(seconds=index)))
    return ids


def test_the_results_table_shows_the_newest_50_and_says_how_to_see_more(invoke, sqlite_url):
    ids = _many_jobs(sqlite_url, 60)
    table = invoke("results")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["id", "batch", "task"]  # plain aligned text when not a terminal
    shown = [line.split()[0] for line in lines[1:]]
    assert shown == ids[10:]  # the newest 50, oldest first
    assert "the newest 50 matching jobs; more match" in table.stderr
    assert "--limit N" in table.stderr and "--format csv" in table.stderr
    by_task = invoke("results", "--sort", "-task")  # another order: its first 50
    assert [line.split()[2] for line in by_task.stdout.splitlines()[1:]] == sorted(
        (f"t{i}" for i in range(60)), reverse=True)[:50]
    assert "the first 50 matching jobs" in by_task.stderr
    # An explicit --limit, or json/csv, are never capped and need no footer.
    limited = invoke("results", "--limit", "55")
    assert len(limited.stdout.splitlines()) == 56 and limited.stderr == ""
    assert len(json.loads(invoke("results", "--format", "json").stdout)) == 60
    assert len(invoke("results", "--format", "csv").stdout.splitlines()) == 61
    few = invoke("results", "--task", "t3")
    assert len(few.stdout.splitlines()) == 2 and few.stderr == ""


def test_results_and_status_draw_rich_tables_on_a_terminal(invoke, sqlite_url, monkeypatch):
    import jobs.cli

    _finished_batch(sqlite_url)
    monkeypatch.setattr(jobs.cli, "_is_terminal", lambda: True)
    table = invoke("results").stdout
    assert "┃" in table or "│" in table  # rich's box drawing
    assert "succeeded" in table and "failed" in table
    status = invoke("status").stdout
    assert "batches" in status and "finished" in status and ("│" in status or "┃" in status)


def test_show_prints_one_job_in_full(invoke, sqlite_url):
    _, ids = _finished_batch(sqlite_url)
    text = invoke("show", ids[2]).output
    assert "unknown target module" in text and "Traceback..." in text and "spec:" in text
    full = json.loads(invoke("show", ids[0], "--format", "json").output)
    assert full["adapter_path"] == f"/art/{ids[0]}/adapter" and full["versions"] == {"torch": "2"}
    assert [p["loss"] for p in full["loss_curve"]] == [3.0, 2.0]
    missing = CliRunner().invoke(cli, ["--database-url", sqlite_url, "show", "nosuchjob"])
    assert missing.exit_code == 2 and "no job with id 'nosuchjob'" in missing.output


def test_cancel_needs_ids_or_a_batch(invoke):
    result = CliRunner().invoke(cli, ["cancel"])
    assert result.exit_code == 2 and "give job ids or --batch" in result.output


def test_db_upgrade_creates_and_then_keeps_the_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'up.db'}"
    first = CliRunner().invoke(cli, ["--database-url", url, "db", "upgrade"])
    assert first.exit_code == 0 and "upgraded from revision none" in first.output
    clear_cache()
    second = CliRunner().invoke(cli, ["--database-url", url, "db", "upgrade"])
    assert "already at schema revision" in second.output
    clear_cache()


def test_an_unusable_database_url_is_a_clear_error():
    result = CliRunner().invoke(cli, ["--database-url", "nosuchdriver://x/y", "results"])
    assert result.exit_code == 1 and "cannot open the database" in result.output


PROBE = """
import json, sys
from jobs.cli import main
try:
    main()
except SystemExit:
    pass
heavy = [m for m in ("torch", "transformers", "peft", "celery", "kombu", "matplotlib") if m in sys.modules]
sys.stderr.write("GRAFTQ_MODULES=" + json.dumps(heavy) + "\\n")
"""


@pytest.mark.parametrize("args", [["--help"], ["submit", "--dry-run", "BATCH"], ["results"], ["status"],
                                  ["show", "--help"], ["report", "--help"]], ids=" ".join)
def test_light_commands_never_import_torch_or_celery(args, batch_file, graftq_env):
    args = [str(batch_file) if a == "BATCH" else a for a in args]
    result = subprocess.run(["python", "-c", PROBE, *args], cwd=ROOT, env=graftq_env, capture_output=True,
                            text=True, timeout=120, executable=graftq_argv()[0])
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("GRAFTQ_MODULES=")]
    assert json.loads(line.split("=", 1)[1]) == []


def test_results_reads_without_rich(sqlite_url, graftq_env):
    # rich is a third of a results start; json, csv and a plain table need none of it.
    _finished_batch(sqlite_url)
    probe = PROBE.replace('("torch", "transformers", "peft", "celery", "kombu", "matplotlib")', '("rich",)')
    for args in (["results"], ["results", "--sort", "train_loss", "--limit", "2", "--format", "json"]):
        result = subprocess.run(["python", "-c", probe, *args], cwd=ROOT, env=graftq_env, capture_output=True,
                                text=True, timeout=120, executable=graftq_argv()[0])
        assert result.returncode == 0, result.stderr
        [line] = [line for line in result.stderr.splitlines() if line.startswith("GRAFTQ_MODULES=")]
        assert json.loads(line.split("=", 1)[1]) == [], args


def test_submitted_messages_are_what_send_task_sends(redis_url, redis_server):
    # A stock Celery worker reads them: only ids and delivery tags differ from a plain send_task.
    from jobs.celery_app import RUN_JOB_TASK, configure
    from jobs.settings import Settings
    from jobs.submit import publish_jobs

    # Configured for another broker first, it still publishes to the one it is configured for last
    # (Celery's own producer pool would stay bound to the first broker it was used with).
    assert publish_jobs(configure(Settings(broker_url="memory://")), ["e" * 16], [None]) == ["e" * 16]
    app = configure(Settings(broker_url=redis_url))
    client = redis_server.client()
    client.flushdb()
    # a job of priority 0 (the default) is sent with the message priority that kombu serves last
    app.send_task(RUN_JOB_TASK, args=["a" * 16], task_id="a" * 16, queue="graftq.cpu", ignore_result=True,
                  priority=9)
    assert publish_jobs(app, ["b" * 16, "c" * 16], ["graftq.cpu", None]) == ["b" * 16, "c" * 16]
    reference, ours = (json.loads(m) for m in queued_messages(client, "graftq.cpu"))
    [default_queue] = [json.loads(m) for m in queued_messages(client, "graftq")]
    assert default_queue["headers"]["id"] == "c" * 16 and default_queue["properties"]["delivery_info"] == {
        "exchange": "", "routing_key": "graftq"}

    def normalised(message, job_id):
        message = {**message, "body": json.loads(base64.b64decode(message["body"]))}
        message = json.loads(json.dumps(message).replace(job_id, "JOB"))
        assert message["properties"].pop("delivery_tag")
        return message

    assert normalised(ours, "b" * 16) == normalised(reference, "a" * 16)
    assert normalised(ours, "b" * 16)["body"][0] == ["JOB"]
    client.flushdb()


def test_the_module_entry_point_runs(graftq_env):
    result = subprocess.run(graftq_argv("--help"), cwd=ROOT, env=graftq_env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "graftq" in result.stdout
    for command in ("run", "submit", "worker", "status", "results", "show", "cancel", "db", "report"):
        assert command in result.stdout


def test_a_broker_that_dies_midway_leaves_no_queued_row_without_a_message(invoke, batch_file, redis_url,
                                                                           redis_server, sqlite_url, monkeypatch):
    from celery.signals import after_task_publish

    import jobs.submit

    monkeypatch.setattr(jobs.submit, "PUBLISH_CHUNK", 2)
    published = []

    def kill_the_broker_in_the_second_chunk(**_):
        published.append(1)
        if len(published) == 3:
            redis_server.stop(kill=True)

    after_task_publish.connect(kill_the_broker_in_the_second_chunk, weak=False)
    try:
        result = invoke("submit", str(batch_file), broker=redis_url)
    finally:
        after_task_publish.disconnect(kill_the_broker_in_the_second_chunk)
        redis_server.start()
    assert result.exit_code == 1, result.output
    assert "failed after 2 of 4 jobs" in result.output and "marked failed" in result.output
    from db.queries import jobs_of_batch, status_counts

    with get_database(sqlite_url).read() as session:
        [batch] = status_counts(session)
        jobs = jobs_of_batch(session, batch.batch_id)
    # The two jobs whose message went out stay queued; the two that were never sent are failed.
    assert [(j.status, j.published_at is not None) for j in jobs] == [
        ("queued", True), ("queued", True), ("failed", False), ("failed", False)]
    assert all("not enqueued" in j.error for j in jobs[2:])


def test_status_shows_running_jobs_progress_and_watch_ends_when_all_finished(invoke, sqlite_url):
    from db.claims import claim_job, record_progress
    from db.queries import request_cancel
    from db.submission import create_batch

    batch_id, ids = _finished_batch(sqlite_url)

    database = get_database(sqlite_url)
    with database.begin() as session:
        other, [running] = create_batch(session, "busy", [{"task": "long", "kind": "train", "extension": "lora",
                                                          "base_model": "random:t5-tiny", "queue": "graftq",
                                                          "spec": {}}])
        token = claim_job(session, running, "graftq-gpu0@host:1", 60).token
        record_progress(session, running, token, 5, 10, 1.25, "train")
    output = invoke("status").output
    assert "busy" in output and "finished" in output
    assert running in output and "5/10" in output and "1.25" in output and "graftq-gpu0@host:1" in output
    with database.begin() as session:
        request_cancel(session, [running])
    watched = invoke("status", batch_id, "--watch", "--interval", "0.1")  # nothing unfinished: returns at once
    assert watched.exit_code == 0 and "finished" in watched.output and "busy" not in watched.output
    assert invoke("status", "nosuchbatch").exit_code == 2


def test_a_bad_setting_in_the_environment_is_a_usage_error(batch_file, monkeypatch):
    monkeypatch.setenv("GRAFTQ_STALE_AFTER", "soon")
    result = CliRunner().invoke(cli, ["submit", str(batch_file)])
    assert result.exit_code == 2 and "GRAFTQ_STALE_AFTER='soon' is not a number" in result.output
