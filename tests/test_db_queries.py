"""Claims, heartbeats, fenced writes, cancel, results: against real SQLite files (and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from sqlalchemy import insert, update

from db.claims import (
    claim_job,
    fail_job,
    find_stale_jobs,
    finish_job,
    heartbeat,
    record_progress,
    release_job,
    requeue_stale_job,
    settle_stale_job,
)
from db.queries import get_job, loss_curve, request_cancel, result_rows, status_counts
from db.session import clear_cache, get_database
from db.submission import create_batch, mark_batch_published, mark_published
from db.tables import RESULT_FIELDS, JobStatus, jobs, utcnow


def _jobs(n: int, **overrides):
    rows = []
    for i in range(n):
        row = {"task": f"t{i % 3}", "kind": "train", "extension": ("lora", "layer", "hybrid")[i % 3],
               "base_model": "random:t5-tiny", "requested_device": "auto", "queue": "graftq",
               "spec": {"task": f"t{i % 3}"}}
        row.update(overrides)
        rows.append(row)
    return rows


@pytest.fixture
def database(sqlite_url):
    database = get_database(sqlite_url)
    yield database
    clear_cache()


@pytest.fixture
def one_job(database):
    with database.begin() as connection:
        batch_id, [job_id] = create_batch(connection, "b", _jobs(1), max_attempts=2)
    return batch_id, job_id


def _age_heartbeat(database, job_id, seconds):
    with database.begin() as connection:
        connection.execute(update(jobs).where(jobs.c.id == job_id).values(
            heartbeat_at=utcnow() - dt.timedelta(seconds=seconds)))


def test_marking_a_batch_published_keeps_earlier_times_and_leaves_other_batches(database):
    earlier = utcnow() - dt.timedelta(hours=1)
    with database.begin() as connection:
        batch_id, job_ids = create_batch(connection, "b", _jobs(3))
        other_batch, [other_job] = create_batch(connection, "other", _jobs(1))
        mark_published(connection, job_ids[:1], when=earlier)
    with database.begin() as connection:
        assert mark_batch_published(connection, batch_id) == 2
    with database.read() as connection:
        first, *rest = (get_job(connection, job_id) for job_id in job_ids)
        assert first.published_at == earlier
        assert all(job.published_at is not None and job.published_at > earlier for job in rest)
        assert get_job(connection, other_job).published_at is None


def test_a_claim_returns_what_the_worker_needs_to_run_the_job(database, one_job):
    batch_id, job_id = one_job
    with database.begin() as connection:
        claim = claim_job(connection, job_id, "w1", stale_after=60)
        assert claim_job(connection, job_id, "w2", stale_after=60) is None
    assert (claim.batch_id, claim.spec, claim.attempts, claim.queue) == (batch_id, {"task": "t0"}, 1, "graftq")
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert (job.status, job.claim_token, job.attempts, job.worker) == ("running", claim.token, 1, "w1")


def test_only_one_of_two_workers_claims_a_queued_job(database, one_job):
    _, job_id = one_job
    with database.begin() as connection:
        first = claim_job(connection, job_id, "w1", stale_after=60)
    with database.begin() as connection:
        second = claim_job(connection, job_id, "w2", stale_after=60)
    assert first is not None and second is None
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert (job.status, job.attempts, job.worker) == ("running", 1, "w1")


def test_a_stale_claim_is_taken_over_and_the_old_worker_is_fenced_out(database, one_job):
    _, job_id = one_job
    with database.begin() as connection:
        old = claim_job(connection, job_id, "w1", stale_after=60).token
    _age_heartbeat(database, job_id, 120)
    with database.begin() as connection:
        new = claim_job(connection, job_id, "w2", stale_after=60).token
    assert new is not None and new != old
    with database.begin() as connection:
        assert heartbeat(connection, job_id, old).held is False
        assert record_progress(connection, job_id, old, 3, 10, 1.0) is False
        assert not finish_job(connection, job_id, old, stats={"base_params": 1}, metrics={}, device="cpu",
                              dtype="float32", versions={}, job_dir="/nope")
        assert heartbeat(connection, job_id, new).held is True
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert (job.status, job.attempts, job.worker, job.base_params) == ("running", 2, "w2", None)


def test_a_job_that_keeps_killing_its_worker_ends_failed_at_the_attempt_limit(database, one_job):
    _, job_id = one_job  # max_attempts=2
    for worker in ("w1", "w2"):
        with database.begin() as connection:
            assert claim_job(connection, job_id, worker, stale_after=60)
        _age_heartbeat(database, job_id, 120)
    with database.begin() as connection:
        assert claim_job(connection, job_id, "w3", stale_after=60) is None
        assert settle_stale_job(connection, job_id, stale_after=60) == "failed"
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert job.status == "failed" and job.attempts == 2 and "attempt" in job.error


def test_finish_records_statistics_metrics_paths_and_the_loss_curve(database, one_job):
    _, job_id = one_job
    with database.begin() as connection:
        token = claim_job(connection, job_id, "w1", stale_after=60).token
        assert record_progress(connection, job_id, token, 5, 10, 2.5, "train")
    with database.begin() as connection:
        assert finish_job(
            connection, job_id, token,
            stats={"base_params": 1000, "total_params": 1100, "trainable_params": 100, "lora_params": 100,
                   "layer_params": 0, "trainable_pct": 10.0},
            metrics={"train_loss": 1.5, "eval_loss": 1.7, "steps": 10, "tokens_per_second": 99.0,
                     "train_seconds": 2.0, "peak_memory_mb": 12.0},
            device="cpu", dtype="float32", versions={"torch": "x"}, job_dir="/a/b",
            adapter_path="/a/b/adapter", loss_curve=[(1, "train", 3.0), (10, "train", 1.5), (10, "eval", 1.7)],
        )
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert job.status == "succeeded" and job.finished_at is not None and job.finished_at.tzinfo is not None
        assert (job.trainable_params, job.train_loss, job.adapter_path, job.layer_path) == (100, 1.5, "/a/b/adapter", None)
        assert loss_curve(connection, job_id) == [(10, "eval", 1.7), (1, "train", 3.0), (10, "train", 1.5)]


def test_finish_refuses_a_statistic_or_metric_that_is_not_a_result_field(database, one_job):
    _, job_id = one_job
    with database.begin() as connection:
        token = claim_job(connection, job_id, "w1", stale_after=60).token
    with database.begin() as connection, pytest.raises(
            ValueError, match=rf"job {job_id}: metrics key\(s\) 'initial_eval_loss' are not result fields; "
                              "record only train_loss, eval_loss"):
        finish_job(connection, job_id, token, stats={"base_params": 10},
                   metrics={"eval_loss": 1.0, "initial_eval_loss": 2.0}, device="cpu", dtype="float32",
                   versions={}, job_dir="/x")
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert (job.status, job.base_params, job.eval_loss) == ("running", None, None)  # nothing recorded


def test_cancel_stops_a_queued_job_at_once_and_flags_a_running_one(database):
    with database.begin() as connection:
        _, (queued, running, done) = create_batch(connection, "b", _jobs(3))
        token = claim_job(connection, running, "w", stale_after=60).token
        other = claim_job(connection, done, "w", stale_after=60).token
        fail_job(connection, done, other, "boom")
    with database.begin() as connection:
        outcome = request_cancel(connection, [queued, running, done, "nope"])
    assert outcome == {queued: "cancelled", running: "cancelling", done: "already failed", "nope": "not found"}
    with database.begin() as connection:
        assert claim_job(connection, queued, "w2", stale_after=60) is None  # a cancelled job never starts
        assert heartbeat(connection, running, token).cancel_requested is True


def test_a_transient_failure_releases_the_job_until_the_attempt_limit(database, one_job):
    _, job_id = one_job  # max_attempts=2
    with database.begin() as connection:
        token = claim_job(connection, job_id, "w", stale_after=60).token
        assert release_job(connection, job_id, token, "redis went away")
        token = claim_job(connection, job_id, "w", stale_after=60).token
        assert release_job(connection, job_id, token, "again") is False  # attempts exhausted: caller fails it


def test_the_reaper_requeues_a_stale_job_with_attempts_left(database, one_job):
    _, job_id = one_job
    with database.begin() as connection:
        claim_job(connection, job_id, "w", stale_after=60)
    with database.read() as connection:
        assert not find_stale_jobs(connection, 60)
    _age_heartbeat(database, job_id, 120)
    with database.begin() as connection:
        assert find_stale_jobs(connection, 60) == [job_id]
        assert requeue_stale_job(connection, job_id, 60)
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert (job.status, job.claim_token, job.attempts) == ("queued", None, 1)


def test_results_filter_and_sort_with_missing_values_last(database):
    with database.begin() as connection:
        batch_id, ids = create_batch(connection, "sorting", _jobs(6))
        for job_id, loss in zip(ids, [3.0, None, 1.0, 2.0, None, 0.5]):
            token = claim_job(connection, job_id, "w", stale_after=60).token
            if loss is not None:
                finish_job(connection, job_id, token, stats={}, metrics={"train_loss": loss}, device="cpu",
                           dtype="float32", versions={}, job_dir="/x")
    with database.read() as connection:
        ascending = result_rows(connection, batch="sorting", sort="train_loss")
        assert [r["train_loss"] for r in ascending] == [0.5, 1.0, 2.0, 3.0, None, None]
        descending = result_rows(connection, batch=batch_id, sort="train_loss", descending=True, limit=5)
        assert [r["train_loss"] for r in descending] == [3.0, 2.0, 1.0, 0.5, None]
        assert all(r["extension"] == "layer" for r in result_rows(connection, extension="layer"))
        assert len(result_rows(connection, status="running")) == 2
        assert list(ascending[0]) == list(RESULT_FIELDS) and ascending[0]["batch"] == "sorting"
        with pytest.raises(ValueError, match="cannot sort"):
            result_rows(connection, sort="spec")
        [counts] = status_counts(connection, batch_id)
        assert counts.counts == {"succeeded": 4, "running": 2} and counts.total == 6


@pytest.mark.slow
def test_results_sort_and_limit_on_many_jobs(database):
    # Speed on 100,000 jobs is measured by benchmarks/bench_results_query.py; here: the order.
    rng = random.Random(0)
    with database.begin() as connection:
        batch_id, _ = create_batch(connection, "big", [])
        now = utcnow()
        for start in range(0, 20_000, 10_000):
            connection.execute(insert(jobs), [
                {"id": f"{i:016x}", "batch_id": batch_id, "position": i, "task": f"task{i % 50}", "kind": "train",
                 "extension": ("lora", "layer", "hybrid")[i % 3], "base_model": "random:t5-tiny",
                 "requested_device": "auto", "spec": {}, "status": "succeeded", "attempts": 1, "max_attempts": 3,
                 "cancel_requested": False, "created_at": now,
                 "train_loss": None if i % 10 == 0 else rng.random(), "eval_loss": rng.random()}
                for i in range(start, start + 10_000)
            ])
    with database.read() as connection:
        every = result_rows(connection)
    for sort, descending in (("train_loss", False), ("train_loss", True), ("eval_loss", True)):
        with database.read() as connection:
            rows = result_rows(connection, sort=sort, descending=descending, limit=20)
        present = sorted((r for r in every if r[sort] is not None), key=lambda r: (r[sort], r["id"]),
                         reverse=descending)
        assert [r["id"] for r in rows] == [r["id"] for r in present[:20]]
    with database.read() as connection:
        values = [r["train_loss"] for r in result_rows(connection, sort="train_loss", limit=20)]
    assert values == sorted(values) and None not in values


@pytest.mark.postgres
def test_claims_and_fenced_writes_on_postgresql(postgres_database):
    from db.session import create_database_engine, upgrade_to_head

    url = postgres_database
    engine = create_database_engine(url)
    upgrade_to_head(url, engine)
    engine.dispose()
    database = get_database(url)
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "pg", _jobs(1))
    with database.begin() as connection:
        token = claim_job(connection, job_id, "w1", stale_after=60).token
        assert claim_job(connection, job_id, "w2", stale_after=60) is None
    with database.begin() as connection:
        assert finish_job(connection, job_id, token, stats={"trainable_params": 5}, metrics={"train_loss": 1.0},
                          device="cpu", dtype="float32", versions={}, job_dir="/x")
    with database.read() as connection:
        [row] = result_rows(connection, batch="pg")
        assert row["status"] == "succeeded" and row["trainable_params"] == 5
        assert row["finished_at"].tzinfo is not None


def test_job_status_values_are_the_documented_ones():
    assert [s.value for s in JobStatus] == ["waiting", "queued", "running", "succeeded", "failed", "cancelled", "skipped"]


def test_a_dead_graftq_run_job_is_failed_not_requeued(database):
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "embedded", _jobs(1, queue=None))
        claim_job(connection, job_id, "local", stale_after=60)
    _age_heartbeat(database, job_id, 120)
    with database.begin() as connection:
        assert requeue_stale_job(connection, job_id, 60) is False  # no queue would ever deliver it
        assert settle_stale_job(connection, job_id, 60) == "failed"
    with database.read() as connection:
        assert "graftq run" in get_job(connection, job_id).error
