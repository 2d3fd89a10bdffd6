"""Jobs that wait for other jobs: recording, release and skip in the outcome's transaction, the
checks of `job:ID` references, `graftq run`'s order, and a real worker running a parent, then its child.

Batches are built by hand (`Batch(..., needs=[...])`), as the batch parser hands them over.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from db.claims import claim_job, fail_job, finish_job, settle_stale_job
from db.dependencies import released_unpublished, settle_waiting
from db.queries import get_job, jobs_of_batch, request_cancel, unpublished_queued
from db.session import clear_cache, get_database
from db.submission import create_batch, mark_batch_published
from db.tables import batches, job_needs, jobs, utcnow
from jobs.batch import Batch
from jobs.cli import cli
from jobs.errors import SpecError
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.submit import record_batch, submit_batch
from tests.conftest import ROOT, graftq_argv

T5 = "random:t5-tiny"


def _spec(task: str, extension: str = "lora", **keys) -> JobSpec:
    return JobSpec.model_validate({"task": task, "kind": "create", "extension": extension, "base_model": T5, **keys})


def _row(task: str, needs=(), **keys) -> dict:
    return {"task": task, "kind": "create", "extension": "hybrid", "base_model": T5, "queue": "graftq",
            "spec": {"task": task}, "needs": list(needs), **keys}


@pytest.fixture
def database(sqlite_url):
    yield get_database(sqlite_url)
    clear_cache()


@pytest.fixture
def settings(sqlite_url, artifacts_dir):
    return Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir, stale_after=20, heartbeat_interval=5)


def _chain(database, *, max_attempts: int = 3) -> tuple[str, str, str]:
    """parent <- child <- grandchild, recorded; returns their ids."""
    with database.begin() as connection:
        _, (parent, child, grandchild) = create_batch(connection, "chain", [
            _row("parent", id="p" * 16), _row("child", ["p" * 16], id="c" * 16), _row("grand", ["c" * 16])],
            max_attempts=max_attempts)
    return parent, child, grandchild


def _status(database, *job_ids):
    with database.read() as connection:
        return [get_job(connection, job_id).status for job_id in job_ids]


def _succeed(connection, job_id, token, **paths) -> bool:
    return finish_job(connection, job_id, token, stats={}, metrics={}, device="cpu", dtype="float32", versions={},
                      job_dir=None, **paths)


# --- recording ------------------------------------------------------------------------------------


def test_a_job_with_unmet_needs_is_recorded_waiting_with_its_needs_and_from_rewritten_to_its_id(database, settings):
    batch = Batch("pipeline", None, T5, jobs=[
        _spec("block", "layer", name="block"),
        _spec("task-a", "hybrid", name="a", needs=["block"], layer={"from": "block", "freeze": True}),
        _spec("task-b", "hybrid", name="b", needs=["a"]),
    ], params=[{}, {"lora.r": 4}, {}], needs=[[], [0], [1]])
    submitted = record_batch(database, batch, settings)
    block, a, b = submitted.job_ids
    assert submitted.waiting == {a, b}
    with database.read() as connection:
        rows = {row.id: row for row in jobs_of_batch(connection, submitted.batch_id)}
        needs = sorted(connection.execute(select(job_needs.c.job_id, job_needs.c.needed_id)).all())
    assert [rows[i].status for i in (block, a, b)] == ["queued", "waiting", "waiting"]
    assert rows[block].queued_at is not None and rows[a].queued_at is None
    assert (rows[a].name, rows[a].params) == ("a", {"lora.r": 4})
    assert rows[a].spec["layer"]["from"] == f"job:{block}" and rows[a].spec["needs"] == [f"job:{block}"]
    assert needs == sorted([(a, block), (b, a)])
    with database.begin() as connection:  # what `graftq submit` marks after publishing
        assert mark_batch_published(connection, submitted.batch_id) == 1
        assert get_job(connection, a).published_at is None


# --- release and skip, in the outcome's transaction -----------------------------------------------


def test_a_success_releases_its_children_in_the_same_transaction(database):
    parent, child, grandchild = _chain(database)
    with database.begin() as connection:
        token = claim_job(connection, parent, "w", 20).token
    # The outcome rolled back: the child was never released either.
    with database.engine.connect() as connection:
        transaction = connection.begin()
        assert _succeed(connection, parent, token)
        assert get_job(connection, child).status == "queued"
        transaction.rollback()
    assert _status(database, parent, child, grandchild) == ["running", "waiting", "waiting"]

    before = utcnow()
    with database.begin() as connection:
        assert _succeed(connection, parent, token)
    with database.read() as connection:
        job = get_job(connection, child)
        assert (job.status, job.published_at) == ("queued", None) and job.queued_at >= before
        assert [row.id for row in released_unpublished(connection, parent)] == [child]
        assert get_job(connection, grandchild).status == "waiting"  # its own parent has not run


def test_a_job_with_two_needs_is_released_only_when_both_succeeded(database):
    with database.begin() as connection:
        _, (first, second, both) = create_batch(connection, "two", [
            _row("a", id="a" * 16), _row("b", id="b" * 16), _row("ab", ["a" * 16, "b" * 16])])
        first_token = claim_job(connection, first, "w", 20).token
        second_token = claim_job(connection, second, "w", 20).token
    with database.begin() as connection:
        _succeed(connection, first, first_token)
    assert _status(database, both) == ["waiting"]
    with database.begin() as connection:
        _succeed(connection, second, second_token)
    assert _status(database, both) == ["queued"]


def _fail(database, job_id):
    with database.begin() as connection:
        token = claim_job(connection, job_id, "w", 20).token
        assert fail_job(connection, job_id, token, "boom")
    return "failed"


def _cancel(database, job_id):
    with database.begin() as connection:
        assert request_cancel(connection, [job_id]) == {job_id: "cancelled"}
    return "cancelled"


def _settle(database, job_id):  # its worker died on its last attempt
    with database.begin() as connection:
        claim_job(connection, job_id, "w", 20)
        connection.execute(update(jobs).where(jobs.c.id == job_id).values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=60)))
        assert settle_stale_job(connection, job_id, 20) == "failed"
    return "failed"


@pytest.mark.parametrize("end", [_fail, _cancel, _settle], ids=["failed", "cancelled", "settled"])
def test_a_parent_that_does_not_succeed_skips_its_children_and_grandchildren(database, end):
    parent, child, grandchild = _chain(database, max_attempts=1)
    ended = end(database, parent)
    with database.read() as connection:
        rows = [get_job(connection, job_id) for job_id in (parent, child, grandchild)]
    assert [row.status for row in rows] == [ended, "skipped", "skipped"]
    assert rows[1].error == f"skipped: job {parent} (parent) that it needs ended {ended}"
    assert rows[2].error == f"skipped: job {child} (child) that it needs ended skipped"
    assert all(row.finished_at is not None for row in rows)


def test_cancelling_a_batch_cancels_its_waiting_jobs_too(database):
    parent, child, grandchild = _chain(database)
    with database.begin() as connection:
        outcome = request_cancel(connection, [parent, child, grandchild])
    assert outcome == {parent: "cancelled", child: "cancelled", grandchild: "cancelled"}
    assert _status(database, parent, child, grandchild) == ["cancelled"] * 3


def test_the_reaper_publishes_a_released_job_whose_message_was_lost_after_the_grace(database):
    parent, child, _ = _chain(database)
    with database.begin() as connection:
        token = claim_job(connection, parent, "w", 20).token
        _succeed(connection, parent, token)
    with database.read() as connection:
        assert unpublished_queued(connection, 300, released_older_than=4) == []  # just released
    with database.begin() as connection:  # released 10 s ago, created an hour ago; no message
        connection.execute(update(jobs).where(jobs.c.id == child).values(
            queued_at=utcnow() - dt.timedelta(seconds=10), created_at=utcnow() - dt.timedelta(hours=1)))
    with database.read() as connection:
        assert [row.id for row in unpublished_queued(connection, 300, released_older_than=4)] == [child]
        assert unpublished_queued(connection, 300) == []  # without it, the submit grace counts from queued_at
    with database.begin() as connection:  # a row written before queued_at existed: its creation time counts
        connection.execute(update(jobs).where(jobs.c.id == child).values(queued_at=None))
    with database.read() as connection:
        assert [row.id for row in unpublished_queued(connection, 300)] == [child]


def test_the_reaper_releases_or_skips_waiting_jobs_whose_needs_were_decided_behind_its_back(database):
    parent, child, grandchild = _chain(database)
    with database.begin() as connection:
        connection.execute(update(jobs).where(jobs.c.id == parent).values(status="succeeded"))
    with database.begin() as connection:
        assert settle_waiting(connection) == ([child], [])
        connection.execute(update(jobs).where(jobs.c.id == child).values(status="failed"))
    with database.begin() as connection:
        assert settle_waiting(connection) == ([], [grandchild])


@pytest.mark.postgres
def test_release_and_skip_on_postgresql(postgres_database):
    from db.session import create_database_engine, upgrade_to_head

    engine = create_database_engine(postgres_database)
    upgrade_to_head(postgres_database, engine)
    engine.dispose()
    database = get_database(postgres_database)
    parent, child, grandchild = _chain(database)
    with database.begin() as connection:
        token = claim_job(connection, parent, "w", 20).token
        _succeed(connection, parent, token)
    assert _status(database, child, grandchild) == ["queued", "waiting"]
    _fail(database, child)
    assert _status(database, grandchild) == ["skipped"]


@pytest.mark.postgres
def test_two_needs_succeeding_at_the_same_time_on_postgresql_release_the_job(postgres_database):
    import threading

    from db.session import create_database_engine, upgrade_to_head

    engine = create_database_engine(postgres_database)
    upgrade_to_head(postgres_database, engine)
    engine.dispose()
    database = get_database(postgres_database)
    with database.begin() as connection:
        _, (first, second, both) = create_batch(connection, "race", [
            _row("a", id="a" * 16), _row("b", id="b" * 16), _row("ab", ["a" * 16, "b" * 16])])
        tokens = {job_id: claim_job(connection, job_id, "w", 20).token for job_id in (first, second)}

    def succeed_second() -> None:
        with database.begin() as connection:
            _succeed(connection, second, tokens[second])

    # Each outcome, seeing the other one uncommitted, would leave the job waiting for ever; the
    # second outcome must wait for the first's commit and then release it.
    with database.engine.connect() as connection:
        transaction = connection.begin()
        _succeed(connection, first, tokens[first])
        other = threading.Thread(target=succeed_second)
        other.start()
        other.join(1.0)
        assert other.is_alive()  # waiting for the first outcome's lock on the job they release
        transaction.commit()
    other.join(10)
    assert _status(database, first, second, both) == ["succeeded", "succeeded", "queued"]


# --- references to earlier jobs -------------------------------------------------------------------


@pytest.fixture
def earlier(database):
    """An earlier batch: a succeeded lora job, a failed layer job, a queued layer job, a gpt2 job."""
    with database.begin() as connection:
        _, ids = create_batch(connection, "earlier", [
            {**_row("adapter"), "extension": "lora"}, {**_row("broken"), "extension": "layer"},
            {**_row("block"), "extension": "layer"}, {**_row("other"), "base_model": "random:gpt2-tiny"}])
        connection.execute(update(jobs).where(jobs.c.id == ids[0]).values(status="succeeded", adapter_path="/a"))
        connection.execute(update(jobs).where(jobs.c.id == ids[1]).values(status="failed"))
    return dict(zip(("adapter", "broken", "block", "other"), ids, strict=True))


def _count(database, table) -> int:
    with database.read() as connection:
        return connection.scalar(select(func.count()).select_from(table))


def test_unusable_references_to_earlier_jobs_are_refused_naming_job_and_key_and_nothing_is_written(
        database, settings, earlier):
    batch = Batch("refs", None, T5, jobs=[
        _spec("on-adapter", "layer", layer={"from": f"job:{earlier['adapter'][:6]}"}),
        _spec("on-failed", needs=[f"job:{earlier['broken']}"]),
        _spec("on-nothing", needs=["job:ffffffff"]),
        _spec("on-gpt2", needs=[f"job:{earlier['other']}"]),
    ], needs=[[earlier["adapter"][:6]], [earlier["broken"]], ["ffffffff"], [earlier["other"]]])
    rows_before = _count(database, jobs), _count(database, batches)
    with pytest.raises(SpecError) as raised:
        record_batch(database, batch, settings)
    problems = raised.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("job 0 (task 'on-adapter'): key `layer.from`: ") and "saves no layer" in problems[0]
    assert problems[1].startswith("job 1 (task 'on-failed'): key `needs`: ") and "ended failed" in problems[1]
    assert problems[2].startswith("job 2 (task 'on-nothing'): key `needs`: no job job:ffffffff")
    assert "random:gpt2-tiny" in problems[3]
    assert (_count(database, jobs), _count(database, batches)) == rows_before


def test_a_reference_by_prefix_stores_the_full_id_and_waits_for_an_unfinished_job(database, settings, earlier):
    batch = Batch("refs", None, T5, jobs=[
        _spec("continue", "lora", lora={"from": f"job:{earlier['adapter'][:5]}"}),
        _spec("on-block", "hybrid", layer={"from": f"job:{earlier['block']}"}),
    ], needs=[[earlier["adapter"][:5]], [earlier["block"]]])
    submitted = record_batch(database, batch, settings)
    done, waits = submitted.job_ids
    with database.read() as connection:
        row = get_job(connection, done)
        assert row.status == "queued" and row.spec["lora"]["from"] == f"job:{earlier['adapter']}"
        assert get_job(connection, waits).status == "waiting"
    with database.begin() as connection:  # the earlier batch's job succeeds: this batch's job is released
        token = claim_job(connection, earlier["block"], "w", 20).token
        _succeed(connection, earlier["block"], token, layer_path="/l")
    assert _status(database, waits) == ["queued"]


@pytest.mark.postgres
def test_an_earlier_job_that_succeeds_while_a_batch_needing_it_is_written_releases_it_on_postgresql(
        postgres_database):
    import threading

    from db.session import create_database_engine, upgrade_to_head
    from jobs.submit import check_references, job_rows

    engine = create_database_engine(postgres_database)
    upgrade_to_head(postgres_database, engine)
    engine.dispose()
    database = get_database(postgres_database)
    settings = Settings(database_url=postgres_database)
    with database.begin() as connection:
        _, [earlier] = create_batch(connection, "earlier", [{**_row("block"), "extension": "layer"}])
        token = claim_job(connection, earlier, "w", 20).token

    def succeed_earlier() -> None:
        with database.begin() as connection:
            _succeed(connection, earlier, token, layer_path="/l")

    batch = Batch("later", None, T5, jobs=[_spec("on-block", "hybrid", layer={"from": f"job:{earlier}"})],
                  needs=[[earlier]])
    with database.engine.connect() as connection:
        transaction = connection.begin()
        rows = job_rows(batch, settings)
        check_references(connection, batch, rows)
        _, [waiting] = create_batch(connection, "later", rows)  # the earlier job was running: waiting
        other = threading.Thread(target=succeed_earlier)
        other.start()
        other.join(1.0)
        assert other.is_alive()  # the outcome waits for the batch that needs the job to be written
        transaction.commit()
    other.join(10)
    assert _status(database, earlier, waiting) == ["succeeded", "queued"]


def test_graftq_run_refuses_a_from_naming_an_unknown_job_and_writes_nothing(tmp_path, database, sqlite_url,
                                                                             artifacts_dir):
    path = tmp_path / "refs.yaml"
    path.write_text("base_model: random:t5-tiny\njobs:\n"
                    "  - {task: t, kind: create, extension: hybrid, layer: {from: job:ffffffff}}\n")
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "--artifacts-dir", str(artifacts_dir),
                                      "run", str(path)])
    assert result.exit_code == 1, result.output
    assert "job 0 (task 't'): key `layer.from`: no job job:ffffffff in the database" in result.output
    assert _count(database, jobs) == 0 and _count(database, batches) == 0


# --- graftq run -----------------------------------------------------------------------------------


def test_graftq_run_runs_a_parent_before_its_child_listed_first(database, settings, capsys):
    from worker.runner import run_batch

    batch = Batch("order", None, T5, jobs=[_spec("child", needs=["parent"]), _spec("parent", name="parent")],
                  needs=[[1], []])
    assert run_batch(batch, settings, database, interactive=False)
    with database.read() as connection:
        child, parent = jobs_of_batch(connection, connection.scalar(select(batches.c.id)))
    assert (child.status, parent.status) == ("succeeded", "succeeded")
    assert parent.finished_at <= child.started_at
    output = capsys.readouterr().out
    assert output.index(f"job {parent.id} parent") < output.index(f"job {child.id} child")


def test_graftq_run_skips_the_children_of_a_failing_parent_and_exits_non_zero(database, settings, capsys):
    from worker.runner import run_batch

    batch = Batch("failing", None, T5, jobs=[
        _spec("bad", name="bad", lora={"target_modules": ["no_such_module"]}),
        _spec("child", needs=["bad"]), _spec("grandchild", needs=["child"]), _spec("free")],
        needs=[[], [0], [1], []])
    assert not run_batch(batch, settings, database, interactive=False)
    with database.read() as connection:
        rows = jobs_of_batch(connection, connection.scalar(select(batches.c.id)))
    assert [row.status for row in rows] == ["failed", "skipped", "skipped", "succeeded"]
    assert all(row.attempts == 0 for row in rows[1:3])  # never claimed
    output = capsys.readouterr().out
    assert f"job {rows[1].id} child (lora): skipped: job {rows[0].id} (bad) that it needs ended failed" in output
    assert output.count("skipped") >= 4  # two progress lines and two summary rows


def test_ctrl_c_in_graftq_run_cancels_the_running_job_and_the_rest_waiting_ones_included(database, settings,
                                                                                         monkeypatch):
    from worker import runner, tasks

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks.run_job_task, "apply", interrupted)
    batch = Batch("stopped", None, T5, jobs=[_spec("parent", name="parent"), _spec("child", needs=["parent"]),
                                             _spec("free")], needs=[[], [0], []])
    assert not runner.run_batch(batch, settings, database, interactive=False)
    with database.read() as connection:
        rows = jobs_of_batch(connection, connection.scalar(select(batches.c.id)))
    assert [row.status for row in rows] == ["cancelled", "cancelled", "cancelled"]


def test_graftq_run_waits_for_a_job_of_another_batch_that_runs_elsewhere(database, settings, capsys,
                                                                          monkeypatch):
    import threading

    from worker import runner

    monkeypatch.setattr(runner, "WAIT_POLL_INTERVAL", 0.1)
    with database.begin() as connection:
        _, [earlier] = create_batch(connection, "elsewhere", [{**_row("parent"), "extension": "lora"}])
    batch = Batch("after", None, T5, jobs=[_spec("child", needs=[f"job:{earlier}"])], needs=[[earlier]])
    outcome = []
    run = threading.Thread(target=lambda: outcome.append(runner.run_batch(batch, settings, database,
                                                                          interactive=False)))
    run.start()
    time.sleep(1.0)
    assert run.is_alive() and "waiting for a job of another batch" in capsys.readouterr().out
    with database.begin() as connection:
        token = claim_job(connection, earlier, "w", 20).token
        _succeed(connection, earlier, token, adapter_path="/a")
    run.join(60)
    assert outcome == [True]


# --- a real worker ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_runs_the_child_after_its_parent_exactly_once(tmp_path, redis_url, redis_server, sqlite_url,
                                                                artifacts_dir):
    settings = Settings(database_url=sqlite_url, broker_url=redis_url, artifacts_dir=artifacts_dir)
    database = get_database(sqlite_url)
    batch = Batch("pool", None, T5, jobs=[_spec("child", needs=["parent"]), _spec("parent", name="parent")],
                  needs=[[1], []])
    submitted = submit_batch(batch, settings, database)
    child_id, parent_id = submitted.job_ids
    assert submitted.waiting == {child_id}
    assert redis_server.queue_lengths()["graftq"] == 1  # only the parent has a message
    env = {**os.environ, "GRAFTQ_DATABASE_URL": sqlite_url, "GRAFTQ_BROKER_URL": redis_url,
           "GRAFTQ_ARTIFACTS_DIR": str(artifacts_dir), "GRAFTQ_HEARTBEAT_INTERVAL": "1",
           "GRAFTQ_STALE_AFTER": "10", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen(graftq_argv("worker", "--gpus", "none", "--reap-interval", "2"), cwd=tmp_path,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and _status(database, child_id) != ["succeeded"]:
            assert worker.poll() is None, log.read_text()
            time.sleep(0.5)
        text = log.read_text(errors="replace")
        assert _status(database, parent_id, child_id) == ["succeeded", "succeeded"], text[-3000:]
        with database.read() as connection:
            parent, child = get_job(connection, parent_id), get_job(connection, child_id)
        assert parent.finished_at <= child.started_at and child.attempts == 1
        assert text.count(f"job {child_id} (batch") == 1  # claimed once
        assert f"published 1 job(s) that were waiting for it: {child_id}" in text
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        clear_cache()


def test_graftq_cancel_cancels_a_waiting_job(database, sqlite_url):
    parent, child, grandchild = _chain(database)
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "cancel", child])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{child}: cancelled"
    assert _status(database, parent, child, grandchild) == ["queued", "cancelled", "skipped"]
    with database.read() as connection:
        batch_id = get_job(connection, parent).batch_id
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "cancel", "--batch", batch_id])
    assert result.output.strip() == f"batch {batch_id}: 1 already cancelled, 1 already skipped, 1 cancelled"
    assert _status(database, parent) == ["cancelled"]

