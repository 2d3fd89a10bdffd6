"""`graftq worker`: which processes it starts, and the reaper that recovers jobs of dead workers."""

from __future__ import annotations

import datetime as dt

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from db import tables
from db.claims import claim_job
from db.queries import get_job
from db.session import clear_cache, get_database
from db.submission import create_batch
from db.tables import utcnow
from jobs.cli import cli
from jobs.settings import Settings
from worker.launcher import Gpu, GpuSelection, LauncherError, parse_gpus, plan_workers, reap_once


def test_gpu_selection_parsing():
    assert parse_gpus("all") == GpuSelection("all")
    assert parse_gpus("NONE") == GpuSelection("none")
    assert parse_gpus("0,2") == GpuSelection("list", (0, 2))
    for bad in ("gpu0", "1,1", "-1", ","):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_a_bad_gpus_option_is_a_usage_error():
    result = CliRunner().invoke(cli, ["worker", "--gpus", "first"])
    assert result.exit_code == 2 and "--gpus" in result.output and "Traceback" not in result.output


def _gpus(*indices: int) -> list[Gpu]:
    return [Gpu(index, "NVIDIA L4", f"GPU-{index}", f"GPU-{index}") for index in indices]


def test_one_pinned_solo_worker_process_per_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'g.db'}", broker_url="redis://h:1/0")
    workers = plan_workers(settings, GpuSelection("all"), gpus=_gpus(0, 1))
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["GPU-0", "GPU-1"]
    for index, worker in enumerate(workers):
        argv = worker.argv
        assert argv[argv.index("-A") + 1] == "worker.tasks:app"
        assert argv[argv.index("--pool") + 1] == "solo" and argv[argv.index("--concurrency") + 1] == "1"
        assert argv[argv.index("--prefetch-multiplier") + 1] == "1"
        assert argv[argv.index("-Q") + 1] == "graftq.gpu,graftq"
        assert argv[argv.index("-n") + 1] == f"graftq-gpu{index}@%h"
        assert worker.env["GRAFTQ_BROKER_URL"] == "redis://h:1/0"
        assert worker.env["GRAFTQ_DATABASE_URL"] == settings.database_url


def test_without_gpus_all_falls_back_to_one_cpu_worker(tmp_path, caplog):
    workers = plan_workers(Settings(), GpuSelection("all"), gpus=[])
    [worker] = workers
    assert worker.env["CUDA_VISIBLE_DEVICES"] == "" and "graftq.cpu,graftq" in worker.argv
    assert "no NVIDIA GPU found" in caplog.text
    [cpu] = plan_workers(Settings(), GpuSelection("none"), queues="custom")
    assert cpu.argv[cpu.argv.index("-Q") + 1] == "custom"


def test_asking_for_a_gpu_that_is_not_there_is_refused(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(LauncherError, match="GPU 3 not found"):
        plan_workers(Settings(), GpuSelection("list", (0, 3)), gpus=_gpus(0))


def test_the_reaper_requeues_and_republishes_a_dead_workers_job(sqlite_url, redis_url, redis_server, artifacts_dir):
    settings = Settings(database_url=sqlite_url, broker_url=redis_url, artifacts_dir=artifacts_dir,
                        stale_after=20, heartbeat_interval=5)
    database = get_database(sqlite_url)
    rows = [{"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny",
             "queue": "graftq.cpu", "spec": {}}] * 2
    with database.begin() as session:
        _, (alive, dead) = create_batch(session, "reap", rows, max_attempts=3)
        claim_job(session, alive, "w1", 20)
        claim_job(session, dead, "w2", 20)
        session.execute(update(tables.jobs).where(tables.jobs.c.id == dead).values(heartbeat_at=utcnow() - dt.timedelta(seconds=60)))
    counts = reap_once(settings)
    assert counts == {"requeued": 1, "settled": 0, "republished": 1, "lost": 0}
    assert redis_server.queue_lengths()["graftq.cpu"] == 1
    with database.read() as session:
        assert get_job(session, alive).status == "running"
        job = get_job(session, dead)
        assert (job.status, job.attempts, job.published_at is not None) == ("queued", 1, True)
    assert reap_once(settings) == {"requeued": 0, "settled": 0, "republished": 0, "lost": 0}  # nothing twice
    clear_cache()


def test_the_reaper_fails_a_job_that_used_up_its_attempts(sqlite_url, redis_url, redis_server):
    settings = Settings(database_url=sqlite_url, broker_url=redis_url, stale_after=20, heartbeat_interval=5)
    database = get_database(sqlite_url)
    with database.begin() as session:
        _, [job_id] = create_batch(session, "reap", [{"task": "t", "kind": "create", "extension": "lora",
                                                      "base_model": "random:t5-tiny", "queue": "graftq",
                                                      "spec": {}}], max_attempts=1)
        claim_job(session, job_id, "w", 20)
        session.execute(update(tables.jobs).where(tables.jobs.c.id == job_id).values(heartbeat_at=utcnow() - dt.timedelta(seconds=60)))
    assert reap_once(settings)["settled"] == 1
    with database.read() as session:
        job = get_job(session, job_id)
        assert job.status == "failed" and "attempt" in job.error
    assert redis_server.queue_lengths()["graftq"] == 0
    clear_cache()


def test_the_reaper_publishes_queued_jobs_whose_message_was_never_sent(sqlite_url, redis_url, redis_server):
    settings = Settings(database_url=sqlite_url, broker_url=redis_url)
    database = get_database(sqlite_url)
    row = {"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny", "spec": {}}
    with database.begin() as session:
        # An old broker job whose submit died before publishing, a fresh one (a submit may still be
        # publishing it) and a `graftq run` job (no queue: never published).
        _, (orphan, fresh, local) = create_batch(session, "orphans", [{**row, "queue": "graftq"},
                                                                       {**row, "queue": "graftq"},
                                                                       {**row, "queue": None}])
        session.execute(update(tables.jobs).where(tables.jobs.c.id.in_([orphan, local])).values(
            created_at=utcnow() - dt.timedelta(hours=1), queued_at=utcnow() - dt.timedelta(hours=1)))
    assert reap_once(settings)["republished"] == 1
    assert redis_server.queue_lengths()["graftq"] == 1
    with database.read() as session:
        assert get_job(session, orphan).published_at is not None
        assert get_job(session, fresh).published_at is None and get_job(session, local).published_at is None
    clear_cache()


def test_the_reaper_republishes_queued_jobs_whose_messages_a_broker_restart_lost(
        sqlite_url, redis_url, redis_server, tmp_path, dataset):
    import textwrap

    from db.queries import jobs_of_batch

    batch = tmp_path / "b.yaml"
    batch.write_text(textwrap.dedent("""
        base_model: random:t5-tiny
        jobs:
          - {task: a, kind: create, extension: lora}
          - {task: b, kind: create, extension: layer, device: cpu}
          - {task: c, kind: create, extension: hybrid}
    """))
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "--broker-url", redis_url, "submit", str(batch)])
    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip().splitlines()[-1]
    settings = Settings(database_url=sqlite_url, broker_url=redis_url)
    database = get_database(sqlite_url)
    with database.begin() as session:  # published two minutes ago, still waiting in the queue
        session.execute(update(tables.jobs).values(published_at=utcnow() - dt.timedelta(minutes=2)))
    assert reap_once(settings)["lost"] == 0  # every message is still there: nothing published twice
    assert redis_server.queue_lengths() == {"graftq": 2, "graftq.gpu": 0, "graftq.cpu": 1}

    redis_server.stop(kill=True)  # no persistence: the queues are gone
    redis_server.start()
    assert redis_server.queue_lengths() == {"graftq": 0, "graftq.gpu": 0, "graftq.cpu": 0}
    counts = reap_once(settings)
    assert counts["lost"] == 3 and counts["republished"] == 3
    assert redis_server.queue_lengths() == {"graftq": 2, "graftq.gpu": 0, "graftq.cpu": 1}
    with database.read() as session:
        jobs = jobs_of_batch(session, batch_id)
        assert all(job.status == "queued" and job.published_at > utcnow() - dt.timedelta(minutes=1) for job in jobs)
    clear_cache()
