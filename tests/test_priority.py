"""Priorities: `priority` (batch and job), `graftq submit --priority`, the broker's message priority,
the reaper's re-publish, and a real worker that takes a later, more urgent batch first."""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import pytest
from sqlalchemy import update

from db import tables
from db.claims import claim_job
from db.session import clear_cache, get_database
from db.submission import create_batch
from db.tables import utcnow
from jobs.batch import parse_batch
from jobs.celery_app import configure, message_priority
from jobs.errors import SpecError
from jobs.settings import Settings
from tests.conftest import ROOT, WorkerProcess, graftq_argv
from tests.redis_server import queued_messages

CREATE = {"kind": "create", "extension": "lora"}


def _batch(**top):
    return parse_batch({"base_model": "random:t5-tiny", **top, "jobs": [
        {"task": "a", **CREATE}, {"task": "b", "priority": 2, **CREATE}, {"task": "c", **CREATE}]})


def test_a_job_takes_its_own_priority_else_the_batchs_else_0():
    assert _batch().priorities() == [0, 2, 0]
    assert _batch(priority=7).priorities() == [7, 2, 7]
    for bad in (10, -1, "high", True, 1.5):
        with pytest.raises(SpecError, match=r"key `priority`: must be a whole number from 0 to 9"):
            _batch(priority=bad)
    with pytest.raises(SpecError, match=r"job 0 \(task 'a'\): key `priority`: Input should be less than or equal to 9"):
        parse_batch({"base_model": "random:t5-tiny", "jobs": [{"task": "a", "priority": 12, **CREATE}]})


def test_graftq_runs_higher_priority_first_within_dependency_order():
    batch = parse_batch({"base_model": "random:t5-tiny", "jobs": [
        {"task": "low", **CREATE},
        {"task": "parent", "name": "parent", "priority": 1, **CREATE},
        {"task": "child", "needs": ["parent"], "priority": 9, **CREATE},
        {"task": "urgent", "priority": 8, **CREATE}]})
    # the child outranks everything but waits for its parent; equal priorities keep batch order
    assert [batch.jobs[i].task for i in batch.order()] == ["urgent", "parent", "child", "low"]


def _priorities_on_the_broker(client, queue="graftq"):
    return {json.loads(raw)["headers"]["id"]: json.loads(raw)["properties"]["priority"]
            for raw in queued_messages(client, queue)}


def test_submit_records_the_priority_and_sends_it_as_the_message_priority(tmp_path, graftq_env, redis_url,
                                                                           redis_server):
    path = tmp_path / "b.yaml"
    path.write_text("base_model: random:t5-tiny\npriority: 3\njobs:\n  - {task: a, kind: create, extension: lora}\n"
                    "  - {task: b, kind: create, extension: lora, priority: 8}\n")
    env = {**graftq_env, "GRAFTQ_BROKER_URL": redis_url}
    submitted = subprocess.run(graftq_argv("submit", "--priority", "6", str(path)), cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    with get_database(graftq_env["GRAFTQ_DATABASE_URL"]).read() as session:
        jobs = {job.task: job for job in session.execute(tables.jobs.select()).all()}
    # --priority replaces the batch's 3; a job's own priority wins
    assert {task: (job.priority, job.spec["priority"]) for task, job in jobs.items()} == {"a": (6, 6), "b": (8, 8)}
    on_broker = _priorities_on_the_broker(redis_server.client())
    assert on_broker == {jobs["a"].id: message_priority(6), jobs["b"].id: message_priority(8)}
    assert message_priority(9) == 0 and message_priority(0) == 9  # kombu's Redis transport serves 0 first
    # the most urgent message is the one a worker takes first
    assert [json.loads(raw)["headers"]["id"] for raw in queued_messages(redis_server.client(), "graftq")] == [
        jobs["b"].id, jobs["a"].id]
    bad = subprocess.run(graftq_argv("submit", "--priority", "10", str(path)), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--priority" in bad.stderr
    clear_cache()


def test_the_reaper_republishes_a_dead_workers_job_with_its_priority(sqlite_url, redis_url, redis_server):
    from worker.launcher import broker_job_ids, reap_once

    settings = Settings(database_url=sqlite_url, broker_url=redis_url, stale_after=20, heartbeat_interval=5)
    database = get_database(sqlite_url)
    with database.begin() as session:
        _, [job_id] = create_batch(session, "reap", [{"task": "t", "kind": "create", "extension": "lora",
                                                      "base_model": "random:t5-tiny", "queue": "graftq",
                                                      "priority": 7, "spec": {}}])
        claim_job(session, job_id, "w", 20)
        session.execute(update(tables.jobs).where(tables.jobs.c.id == job_id).values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=60)))
    assert reap_once(settings)["republished"] == 1
    assert _priorities_on_the_broker(redis_server.client()) == {job_id: message_priority(7)}
    assert broker_job_ids(settings) == {job_id}  # the lost-message check reads every priority list
    clear_cache()


@pytest.mark.slow
def test_a_later_urgent_batch_starts_on_the_next_free_worker(tmp_path, graftq_env, redis_url, dataset):
    from jobs.submit import submit_batch

    env = {**graftq_env, "GRAFTQ_BROKER_URL": redis_url, "GRAFTQ_HEARTBEAT_INTERVAL": "1"}
    settings = Settings(database_url=graftq_env["GRAFTQ_DATABASE_URL"], broker_url=redis_url)
    database = get_database(settings.database_url)
    train = {"dataset": str(dataset), "max_steps": 15, "batch_size": 4, "eval_fraction": 0.0, "checkpoint_every": 0}
    low = parse_batch({"batch": "low", "base_model": "random:t5-tiny", "jobs": [
        {"task": f"low{i}", "extension": "lora", "train": train} for i in range(3)]})
    high = parse_batch({"batch": "high", "base_model": "random:t5-tiny", "priority": 9,
                        "jobs": [{"task": f"high{i}", **CREATE} for i in range(2)]})

    def jobs():
        with database.read() as session:
            return session.execute(tables.jobs.select()).all()

    submit_batch(low, settings, database)
    with WorkerProcess(env, "--gpus", "none", "--reap-interval", "0") as worker:
        worker.wait_for(lambda: any(job.status == "running" for job in jobs()), timeout=120,
                        what="the first low-priority job to start")
        submit_batch(high, settings, database)
        submitted_at = utcnow()
        worker.wait_for(lambda: all(job.status == "succeeded" for job in jobs()), timeout=240,
                        what="both batches to finish")
    by_task = {job.task: job for job in jobs()}
    high_started = max(by_task[f"high{i}"].started_at for i in range(2))
    low_later = [job for task, job in by_task.items() if task.startswith("low") and job.started_at > submitted_at]
    timeline = sorted((job.started_at.isoformat(), job.task) for job in by_task.values())
    # the low jobs were long enough that some were still queued when the urgent batch came
    assert low_later, f"every low-priority job had started before the urgent batch was submitted: {timeline}"
    assert all(job.started_at > high_started for job in low_later), timeline
    assert {job.priority for job in by_task.values()} == {0, 9}
    configure(Settings())
    clear_cache()
