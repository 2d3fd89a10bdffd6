"""`graftq worker --jobs-per-gpu K`: K worker processes per device, K jobs at once."""

from __future__ import annotations

import pytest

from db import tables
from db.session import clear_cache, get_database
from jobs.batch import parse_batch
from jobs.celery_app import configure
from jobs.settings import Settings
from tests.conftest import WorkerProcess
from worker.launcher import Gpu, GpuSelection, LauncherError, plan_workers


def test_each_gpu_gets_k_processes_pinned_to_it(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    gpus = [Gpu(index, "H100", f"GPU-{index}", f"GPU-{index}") for index in (0, 1)]
    workers = plan_workers(Settings(), GpuSelection("all"), gpus=gpus, jobs_per_gpu=3)
    assert [(w.name, w.env["CUDA_VISIBLE_DEVICES"]) for w in workers] == [
        ("graftq-gpu0-1", "GPU-0"), ("graftq-gpu0-2", "GPU-0"), ("graftq-gpu0-3", "GPU-0"),
        ("graftq-gpu1-1", "GPU-1"), ("graftq-gpu1-2", "GPU-1"), ("graftq-gpu1-3", "GPU-1")]
    assert {w.argv[w.argv.index("-n") + 1] for w in workers} == {f"{w.name}@%h" for w in workers}  # distinct nodes
    assert {w.env["OMP_NUM_THREADS"] for w in workers} == {"5"}  # the host's cores, split
    [single] = plan_workers(Settings(), GpuSelection("list", (1,)), gpus=gpus)
    assert single.name == "graftq-gpu1" and "OMP_NUM_THREADS" not in single.env
    with pytest.raises(LauncherError, match="--jobs-per-gpu 0"):
        plan_workers(Settings(), GpuSelection("none"), jobs_per_gpu=0)


@pytest.mark.slow
def test_a_cpu_worker_with_two_jobs_per_gpu_runs_two_jobs_at_once(tmp_path, graftq_env, redis_url):
    from jobs.submit import submit_batch

    settings = Settings(database_url=graftq_env["GRAFTQ_DATABASE_URL"], broker_url=redis_url)
    database = get_database(settings.database_url)
    app = configure(settings)
    batch = parse_batch({"base_model": "random:t5-tiny", "jobs": [
        {"task": f"small{i}", "kind": "create", "extension": "lora"} for i in range(2)]})

    def jobs():
        with database.read() as session:
            return session.execute(tables.jobs.select()).all()

    env = {**graftq_env, "GRAFTQ_BROKER_URL": redis_url}
    with WorkerProcess(env, "--gpus", "none", "--jobs-per-gpu", "2", "--reap-interval", "0") as worker:
        # both processes idle first: a process that started sooner would otherwise run both short jobs
        worker.wait_for(lambda: len(app.control.ping(timeout=1.0)) == 2, timeout=120, what="two worker processes")
        submit_batch(batch, settings, database)
        worker.wait_for(lambda: all(job.status == "succeeded" for job in jobs()), timeout=180,
                        what="both jobs to finish")
    first, second = sorted(jobs(), key=lambda job: job.started_at)
    assert second.started_at < first.finished_at  # at once
    assert {job.worker.split("@")[0] for job in (first, second)} == {"graftq-cpu-1", "graftq-cpu-2"}
    # each job is measured in its own process
    assert first.peak_memory_mb > 0 and second.peak_memory_mb > 0
    assert "started graftq-cpu-1" in worker.output and "started graftq-cpu-2" in worker.output
    configure(Settings())
    clear_cache()
