"""`graftq retry`: finished jobs go back to `queued` (or `waiting`) with a fresh attempt budget and
their earlier run in `history`; real SQLite files, a real Redis, and one real worker subprocess."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, update

from db.claims import claim_job, fail_job
from db.queries import get_job
from db.session import clear_cache, get_database
from db.submission import create_batch, retry_jobs
from db.tables import JobStatus, job_needs, jobs, utcnow
from jobs.cli import cli
from jobs.spec import JobSpec
from tests.conftest import free_port
from tests.test_queue_e2e import Pool, _write


def _spec(device: str = "auto") -> dict:
    return JobSpec.model_validate({"task": "t", "kind": "create", "extension": "lora",
                                   "base_model": "random:t5-tiny", "device": device}).to_json()


def _row(queue: str | None = "graftq", device: str = "auto") -> dict:
    return {"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny",
            "requested_device": device, "queue": queue, "spec": _spec(device)}


@pytest.fixture
def database(sqlite_url):
    database = get_database(sqlite_url)
    yield database
    clear_cache()


def _finish(database, job_id: str, status: str, error: str = "boom") -> None:
    """Run one attempt of the job on worker `w1` and end it with `status`."""
    with database.begin() as connection:
        token = claim_job(connection, job_id, "w1", stale_after=60).token
        if status == "succeeded":
            connection.execute(update(jobs).where(jobs.c.id == job_id).values(
                status="succeeded", finished_at=utcnow(), claim_token=None))
        else:
            fail_job(connection, job_id, token, error, "Traceback...", status=JobStatus(status))


def _set_status(database, job_id: str, status: str) -> None:
    with database.begin() as connection:
        connection.execute(update(jobs).where(jobs.c.id == job_id).values(status=status))


def test_a_failed_job_is_queued_again_with_a_fresh_budget_and_its_run_in_history(database):
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "b", [_row()], max_attempts=2)
    _finish(database, job_id, "failed", "ConfigError: bad target")
    before = utcnow()
    with database.begin() as connection:
        retried = retry_jobs(connection, [job_id])
    assert retried.queued == {job_id: "graftq"} and not retried.waiting and not retried.refused
    with database.read() as connection:
        job = get_job(connection, job_id)
    assert (job.status, job.attempts, job.cancel_requested, job.claim_token) == ("queued", 0, False, None)
    assert job.error is job.traceback is job.finished_at is job.started_at is job.published_at is None
    assert job.progress_phase is None and job.worker is None and job.queued_at >= before
    [run] = job.history
    assert (run["status"], run["error"], run["attempts"], run["worker"]) == ("failed", "ConfigError: bad target",
                                                                             1, "w1")
    assert dt.datetime.fromisoformat(run["finished_at"]) >= dt.datetime.fromisoformat(run["started_at"])
    # A second failure and retry keeps both runs, oldest first.
    _finish(database, job_id, "failed", "second")
    with database.begin() as connection:
        retry_jobs(connection, [job_id])
    with database.read() as connection:
        assert [run["error"] for run in get_job(connection, job_id).history] == ["ConfigError: bad target", "second"]


def test_only_finished_jobs_that_did_not_succeed_are_retried(database):
    with database.begin() as connection:
        _, ids = create_batch(connection, "b", [_row()] * 6)
    failed, cancelled, skipped, succeeded, running, queued = ids
    _finish(database, failed, "failed")
    _finish(database, cancelled, "cancelled")
    _set_status(database, skipped, "skipped")
    _finish(database, succeeded, "succeeded")
    with database.begin() as connection:
        claim_job(connection, running, "w1", stale_after=60)
    with database.begin() as connection:
        retried = retry_jobs(connection, [*ids, "nosuchjob"], statuses=("failed", "skipped"))
    assert set(retried.queued) == {failed, skipped}
    assert retried.refused == {cancelled: "cancelled", succeeded: "succeeded", running: "running", queued: "queued",
                               "nosuchjob": "missing"}
    with database.read() as connection:
        assert get_job(connection, succeeded).status == "succeeded" and get_job(connection, running).status == "running"
        assert get_job(connection, cancelled).history is None


def test_a_job_whose_needs_have_not_succeeded_waits(database):
    with database.begin() as connection:
        _, (parent, child, other_parent, lucky_child) = create_batch(connection, "b", [_row()] * 4)
        connection.execute(insert(job_needs), [{"job_id": child, "needed_id": parent},
                                               {"job_id": lucky_child, "needed_id": other_parent}])
    _finish(database, parent, "failed")
    _set_status(database, child, "skipped")
    _finish(database, other_parent, "succeeded")
    _set_status(database, lucky_child, "skipped")
    with database.begin() as connection:
        retried = retry_jobs(connection, [parent, child, lucky_child])
    assert set(retried.queued) == {parent, lucky_child} and retried.waiting == {child: [parent]}
    with database.read() as connection:
        waiting = get_job(connection, child)
        assert (waiting.status, waiting.queued_at, waiting.history[0]["status"]) == ("waiting", None, "skipped")


def _chain(database):
    """parent (failed) <- child (skipped) <- grandchild (skipped)."""
    with database.begin() as connection:
        batch_id, (parent, child, grandchild) = create_batch(connection, "b", [_row()] * 3)
        connection.execute(insert(job_needs), [{"job_id": child, "needed_id": parent},
                                               {"job_id": grandchild, "needed_id": child}])
    _finish(database, parent, "failed")
    _set_status(database, child, "skipped")
    _set_status(database, grandchild, "skipped")
    return batch_id, parent, child, grandchild


def test_a_job_is_not_retried_without_the_failed_job_it_needs(database):
    _, parent, child, grandchild = _chain(database)
    with database.begin() as connection:
        retried = retry_jobs(connection, [child, grandchild])
    assert retried.blocked == {child: [parent], grandchild: [child]} and not retried.queued and not retried.waiting
    with database.read() as connection:
        assert get_job(connection, grandchild).status == "skipped" and get_job(connection, child).history is None
    with database.begin() as connection:
        retried = retry_jobs(connection, [grandchild, child, parent])
    assert set(retried.queued) == {parent} and retried.waiting == {child: [parent], grandchild: [child]}


def test_retrying_a_parent_names_the_skipped_jobs_that_need_it(database, sqlite_url, redis_url):
    batch_id, parent, child, grandchild = _chain(database)
    result = _cli(sqlite_url, redis_url, "retry", parent, child[:6])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{parent}: queued", f"{child}: waiting for {parent} to succeed"]
    assert f"1 skipped job(s) need the retried ones and stay skipped; retry them too: graftq retry {grandchild}" \
        in result.stderr
    rest = _cli(sqlite_url, redis_url, "retry", "--batch", batch_id)
    assert rest.stdout.strip() == f"batch {batch_id}: 0 queued, 1 waiting; left as they are: 1 queued, 1 waiting"


@pytest.mark.postgres
def test_retry_on_postgresql(postgres_database):
    from db.session import create_database_engine, upgrade_to_head

    engine = create_database_engine(postgres_database)
    upgrade_to_head(postgres_database, engine)
    engine.dispose()
    database = get_database(postgres_database)
    with database.begin() as connection:
        _, (parent, child) = create_batch(connection, "b", [_row(), _row(queue=None, device="cpu")])
        connection.execute(insert(job_needs).values(job_id=child, needed_id=parent))
    _finish(database, parent, "failed", "first")
    _set_status(database, child, "skipped")
    with database.begin() as connection:
        retried = retry_jobs(connection, [parent, child], queues={child: "graftq.cpu"})
    assert retried.queued == {parent: "graftq"} and retried.waiting == {child: [parent]}
    with database.read() as connection:
        job, waiting = get_job(connection, parent), get_job(connection, child)
    assert (job.status, job.attempts, job.history[0]["error"], job.queued_at is not None) == ("queued", 0, "first",
                                                                                             True)
    assert (waiting.status, waiting.queue, waiting.history[0]["status"]) == ("waiting", "graftq.cpu", "skipped")


def _cli(sqlite_url: str, broker: str, *args: str):
    return CliRunner().invoke(cli, ["--database-url", sqlite_url, "--broker-url", broker, *args])


def test_retry_publishes_the_queued_jobs_and_sends_graftq_run_jobs_to_the_pool(database, sqlite_url, redis_url,
                                                                              redis_server):
    with database.begin() as connection:
        _, (pooled, local, done) = create_batch(connection, "b", [_row(), _row(queue=None, device="cpu"), _row()])
    _finish(database, pooled, "failed")
    _finish(database, local, "failed")
    _finish(database, done, "succeeded")
    result = _cli(sqlite_url, redis_url, "retry", pooled, local[:8], done)
    assert result.exit_code == 0, result.output
    assert f"{pooled}: queued" in result.stdout and f"{local}: queued" in result.stdout
    assert f"{done}: not retried: it succeeded" in result.stdout
    assert "recorded by `graftq run` go to the worker pool's queues (graftq.cpu)" in result.stderr
    assert redis_server.queue_lengths() == {"graftq": 1, "graftq.gpu": 0, "graftq.cpu": 1}
    with database.read() as connection:
        assert get_job(connection, local).queue == "graftq.cpu"
        assert all(get_job(connection, job_id).published_at is not None for job_id in (pooled, local))


def test_retry_of_a_batch_prints_counts_and_nothing_is_written_with_the_broker_down(database, sqlite_url, redis_url):
    with database.begin() as connection:
        batch_id, ids = create_batch(connection, "b", [_row()] * 4)
    for job_id, status in zip(ids, ("failed", "failed", "cancelled", "succeeded"), strict=True):
        _finish(database, job_id, status)
    down = _cli(sqlite_url, f"redis://127.0.0.1:{free_port()}/0", "retry", "--batch", batch_id)
    assert down.exit_code == 1 and "nothing was retried" in down.output and "cannot reach the broker" in down.output
    with database.read() as connection:
        assert [get_job(connection, job_id).status for job_id in ids] == ["failed", "failed", "cancelled",
                                                                          "succeeded"]
    result = _cli(sqlite_url, redis_url, "retry", "--batch", batch_id, "--status", "failed")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"batch {batch_id}: 2 queued, 0 waiting; left as they are: 1 cancelled, 1 succeeded"
    refused = _cli(sqlite_url, redis_url, "retry", ids[0], "--status", "succeeded")
    assert refused.exit_code == 2 and "succeeded and unfinished jobs are never retried" in refused.output
    assert "give job ids or --batch" in _cli(sqlite_url, redis_url, "retry").output


def test_show_prints_name_params_and_history(database, sqlite_url, redis_url):
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "b", [_row()])
        connection.execute(update(jobs).where(jobs.c.id == job_id).values(
            name="probe", params={"lora.r": 8, "train.learning_rate": 0.001}))
    _finish(database, job_id, "failed", "ValueError: first try")
    assert _cli(sqlite_url, redis_url, "retry", job_id).exit_code == 0
    text = _cli(sqlite_url, redis_url, "show", job_id).stdout
    assert "  name               probe" in text
    assert "params:\n  lora.r              8\n  train.learning_rate 0.001" in text
    assert "history (earlier runs, oldest first):\n  1. failed after 1 attempt(s) on w1" in text
    assert "     error: ValueError: first try" in text
    full = json.loads(_cli(sqlite_url, redis_url, "show", job_id, "--format", "json").stdout)
    assert full["params"] == {"lora.r": 8, "train.learning_rate": 0.001} and full["name"] == "probe"
    assert [run["error"] for run in full["history"]] == ["ValueError: first try"]


TRAIN_JOB = """
    batch: retry
    base_model: random:t5-tiny
    jobs:
      - task: reverse
        extension: lora
        lora: {r: 2}
        train: {dataset: data/reverse.jsonl, max_steps: 2, batch_size: 4, eval_fraction: 0.2, checkpoint_every: 0}
"""


@pytest.mark.slow
def test_a_failed_job_is_retried_and_succeeds_on_a_real_worker(tmp_path, redis_server, dataset):
    redis_server.start()
    redis_server.flush()
    pool = Pool(tmp_path, redis_server)
    batch_id = pool.submit(_write(tmp_path, "retry.yaml", TRAIN_JOB))
    rows = dataset.read_text()
    dataset.unlink()  # the job fails when the worker reads it
    pool.start_worker()
    try:
        pool.wait_for("the job to fail", lambda: pool.jobs(batch_id)[0].status == "failed")
        [job] = pool.jobs(batch_id)
        assert "train.dataset" in job.error and "does not exist" in job.error
        dataset.write_text(rows)
        retried = pool.cli("retry", job.id)
        assert f"{job.id}: queued" in retried.output
        pool.wait_for("the retried job to succeed", lambda: pool.jobs(batch_id)[0].status in ("succeeded", "failed"))
        [job] = pool.jobs(batch_id)
        assert job.status == "succeeded", f"{job.error}\n{pool.log_tail()}"
        assert job.attempts == 1 and job.eval_loss is not None and job.error is None
        shown = pool.cli("show", job.id).output
        assert "history (earlier runs, oldest first):\n  1. failed after 1 attempt(s) on graftq-cpu@" in shown
        assert "does not exist" in shown.split("history", 1)[1]
    finally:
        pool.stop_worker()
        clear_cache()
