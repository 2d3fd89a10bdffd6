"""The queue end to end: `graftq submit` to a real redis-server, `graftq worker --gpus none` as a
real subprocess, tiny `random:t5-tiny` jobs, and the embedded `graftq run`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.queries import get_job, jobs_of_batch
from db.session import clear_cache, get_database
from db.tables import RESULT_FIELDS
from jobs.cli import cli
from tests.conftest import ROOT, graftq_argv
from tests.redis_server import queued_messages

SIX_JOBS = """
    batch: e2e
    base_model: random:t5-tiny
    defaults:
      lora: {r: 4, alpha: 8}
      layer: {init_scale: 0.01}
      train: {dataset: data/reverse.jsonl, max_steps: 3, batch_size: 4, eval_fraction: 0.2, checkpoint_every: 0}
    jobs:
      - {task: reverse, extension: lora}
      - {task: reverse, extension: layer}
      - {task: reverse, extension: hybrid}
      - {task: stats, kind: create, extension: lora}
      - {task: stats, kind: create, extension: layer, layer: {stack: decoder}}
      - {task: stats, kind: create, extension: hybrid}
"""


class Pool:
    """A test's own Redis queues, SQLite file, artifacts dir and one CPU `graftq worker`."""

    def __init__(self, root: Path, redis_server):
        self.root = root
        self.redis = redis_server
        self.database_url = f"sqlite:///{root / 'graftq.db'}"
        self.artifacts = root / "artifacts"
        self.env = dict(os.environ)
        self.env.update(GRAFTQ_DATABASE_URL=self.database_url, GRAFTQ_BROKER_URL=redis_server.url,
                        GRAFTQ_ARTIFACTS_DIR=str(self.artifacts), GRAFTQ_HEARTBEAT_INTERVAL="1",
                        GRAFTQ_STALE_AFTER="10", PYTHONPATH=str(ROOT))
        self.log_path = root / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start_worker(self, gpus: str = "none") -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(graftq_argv("worker", "--gpus", gpus, "--reap-interval", "2"),
                                        cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def stop_worker(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no worker log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cli(self, *args: str):
        return CliRunner().invoke(cli, ["--database-url", self.database_url, "--broker-url", self.redis.url,
                                        "--artifacts-dir", str(self.artifacts), *args], catch_exceptions=False)

    def submit(self, batch_path: Path) -> str:
        result = self.cli("submit", str(batch_path))
        assert result.exit_code == 0, result.output
        return result.stdout.strip().splitlines()[-1]

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            assert self.process is None or self.process.poll() is None, (
                f"the worker exited while waiting for {what}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\nworker log:\n{self.log_tail()}")

    def jobs(self, batch_id: str):
        with get_database(self.database_url).read() as session:
            return jobs_of_batch(session, batch_id)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("pool")
    redis_server.start()
    redis_server.flush()
    data = root / "data"
    data.mkdir()
    words = ["abc", "xyz", "cat", "dog", "sun", "map", "red", "fox", "owl", "bee", "ink", "jar"]
    (data / "reverse.jsonl").write_text("".join(json.dumps({"input": w, "target": w[::-1]}) + "\n" for w in words * 3))
    pool = Pool(root, redis_server)
    pool.start_worker()
    yield pool
    if pool.process is not None and pool.process.poll() is None:
        pool.stop_worker()
    clear_cache()


def _write(root: Path, name: str, body: str) -> Path:
    path = root / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.slow
def test_a_submitted_batch_runs_on_a_cpu_worker_and_records_everything(pool):
    body = SIX_JOBS + '      - {task: needs-gpu, kind: create, extension: lora, device: "cuda:0"}\n'
    batch_id = pool.submit(_write(pool.root, "six.yaml", body))
    pool.wait_for("the six CPU-able jobs to finish",
                  lambda: all(j.status in ("succeeded", "failed", "cancelled") for j in pool.jobs(batch_id)[:6]))
    jobs = pool.jobs(batch_id)
    for job in jobs[:6]:
        assert job.status == "succeeded", f"{job.task}/{job.extension}: {job.error}\n{job.traceback}"
        assert job.attempts == 1 and job.worker.startswith("graftq-cpu@") and job.device == "cpu"
        assert job.dtype == "float32" and job.versions and {"torch", "transformers", "peft"} <= set(job.versions)
        assert job.base_params > 0 and job.total_params > job.base_params
        assert job.trainable_pct == pytest.approx(job.trainable_params / job.base_params * 100)
        job_dir = Path(job.job_dir)
        assert job_dir == pool.artifacts / batch_id / job.id and (job_dir / "job.json").is_file()
        if job.extension in ("lora", "hybrid"):
            assert job.lora_params > 0
        if job.extension in ("layer", "hybrid"):
            assert job.layer_params > 0
        if job.extension == "lora":
            assert job.adapter_path == str(job_dir / "adapter") and job.layer_path is None
            assert (job_dir / "adapter" / "adapter_config.json").is_file()
            assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()
        if job.extension == "layer":
            assert job.layer_path == str(job_dir / "layer") and job.adapter_path is None
            assert list((job_dir / "layer").glob("*.safetensors"))
        if job.kind == "train":
            assert job.steps == 3 and job.train_loss is not None and job.eval_loss is not None
        else:
            assert job.train_loss is None
    # The GPU job waits in graftq.gpu: a CPU-only worker never takes it.
    gpu_job = jobs[6]
    assert gpu_job.status == "queued" and pool.redis.queue_lengths()["graftq.gpu"] == 1

    rows = json.loads(pool.cli("results", "--batch", batch_id, "--format", "json", "--status", "succeeded").output)
    assert len(rows) == 6 and all(list(row) == list(RESULT_FIELDS) for row in rows)
    assert {row["extension"] for row in rows} == {"lora", "layer", "hybrid"}
    table = list(csv.DictReader(io.StringIO(pool.cli("results", "--batch", "e2e", "--format", "csv").output)))
    assert len(table) == 7 and {r["status"] for r in table} == {"succeeded", "queued"}
    trained = [r for r in rows if r["kind"] == "train"]
    assert all(r["train_loss"] is not None and r["steps"] == 3 for r in trained)

    shown = pool.cli("show", jobs[0].id)
    assert "loss curve:" in shown.output and "adapter_path" in shown.output
    cancelled = pool.cli("cancel", gpu_job.id)
    assert f"{gpu_job.id}: cancelled" in cancelled.output

    # A duplicate delivery of a finished job is acknowledged without running it again.
    from jobs.celery_app import RUN_JOB_TASK, configure
    from jobs.settings import Settings

    app = configure(Settings(database_url=pool.database_url, broker_url=pool.redis.url))
    finished_at = jobs[3].finished_at
    app.send_task(RUN_JOB_TASK, args=[jobs[3].id], queue="graftq")
    pool.wait_for("the duplicate message to be consumed", lambda: pool.redis.queue_lengths()["graftq"] == 0, 60)
    time.sleep(2)
    with get_database(pool.database_url).read() as session:
        again = get_job(session, jobs[3].id)
        assert (again.attempts, again.finished_at, again.status) == (1, finished_at, "succeeded")


@pytest.mark.slow
def test_a_running_job_is_cancelled_at_its_next_step(pool):
    batch_id = pool.submit(_write(pool.root, "long.yaml", """
        base_model: random:t5-tiny
        jobs:
          - {task: long, extension: lora, device: cpu,
             train: {dataset: data/reverse.jsonl, max_steps: 5000, batch_size: 2, checkpoint_every: 0}}
    """))
    [job] = pool.jobs(batch_id)
    pool.wait_for("the long job to be training",
                  lambda: (j := pool.jobs(batch_id)[0]).status == "running" and (j.progress_step or 0) > 0)
    result = pool.cli("cancel", job.id)
    assert f"{job.id}: cancelling" in result.output
    requested = time.monotonic()
    pool.wait_for("the running job to stop", lambda: pool.jobs(batch_id)[0].status == "cancelled", 60)
    assert time.monotonic() - requested < 30
    [job] = pool.jobs(batch_id)
    assert job.progress_step < 5000 and job.train_loss is None
    assert not (pool.artifacts / batch_id / job.id).exists()  # nothing half-written is left behind


# SIGKILL of a worker mid-training, a pickled message, SIGTERM during a job: tests/test_faults.py.


# --- graftq run: the embedded worker --------------------------------------------------------------


EMBEDDED = """
    batch: embedded
    base_model: random:t5-tiny
    defaults:
      train: {dataset: data/reverse.jsonl, max_steps: 2, batch_size: 4, checkpoint_every: 0}
    jobs:
      - {task: reverse, extension: lora}
      - {task: stats, kind: create, extension: layer}
      - {task: reverse, extension: hybrid, lora: {r: 2}}
"""


@pytest.mark.slow
def test_graftq_run_executes_every_job_in_process(tmp_path, dataset, sqlite_url, artifacts_dir):
    path = _write(tmp_path, "embedded.yaml", EMBEDDED)
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "--artifacts-dir", str(artifacts_dir),
                                      "--broker-url", "redis://127.0.0.1:1/0",  # never contacted
                                      "run", str(path)])
    assert result.exit_code == 0, result.output
    assert "[3/3]" in result.output and "succeeded" in result.output and "summary" in result.output
    rows = json.loads(CliRunner().invoke(cli, ["--database-url", sqlite_url, "results", "--format", "json"]).output)
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert all(Path(r["adapter_path"] or r["layer_path"]).is_dir() for r in rows)
    assert all(str(artifacts_dir) in (r["adapter_path"] or r["layer_path"]) for r in rows)
    clear_cache()


@pytest.mark.slow
def test_graftq_run_exits_non_zero_when_a_job_fails_and_still_runs_the_others(tmp_path, dataset, sqlite_url,
                                                                               artifacts_dir):
    (tmp_path / "broken.jsonl").write_text('{"input": "ab", "target": "ba"}\nnot json\n')  # found by the worker
    path = _write(tmp_path, "failing.yaml", """
        base_model: random:t5-tiny
        jobs:
          - {task: bad, extension: lora, train: {dataset: broken.jsonl, max_steps: 1}}
          - {task: good, kind: create, extension: layer}
    """)
    result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "--artifacts-dir", str(artifacts_dir),
                                      "run", str(path)])
    assert result.exit_code == 1, result.output
    assert "broken.jsonl line 2 is not valid JSON" in result.output
    rows = json.loads(CliRunner().invoke(cli, ["--database-url", sqlite_url, "results", "--format", "json",
                                               "--sort", "task"]).output)
    assert [(r["task"], r["status"]) for r in rows] == [("bad", "failed"), ("good", "succeeded")]
    assert rows[0]["attempts"] == 1  # a deterministic failure is never retried
    clear_cache()


@pytest.mark.slow
def test_graftq_run_as_a_real_process(tmp_path, dataset, graftq_env):
    path = _write(tmp_path, "embedded.yaml", EMBEDDED)
    result = subprocess.run(graftq_argv("run", str(path)), cwd=tmp_path, env=graftq_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("succeeded") >= 6  # one line per job + one summary row per job
    assert "Traceback" not in result.stderr
    rows = subprocess.run(graftq_argv("results", "--format", "json"), cwd=tmp_path, env=graftq_env,
                          capture_output=True, text=True, timeout=60)
    assert [r["status"] for r in json.loads(rows.stdout)] == ["succeeded"] * 3


# --- the task's claim logic, without a model: what a duplicate or a dead job's delivery does -----


def _recorded_job(sqlite_url, spec=None, max_attempts=3):
    from db.submission import create_batch

    database = get_database(sqlite_url)
    with database.begin() as session:
        _, [job_id] = create_batch(session, "task-test", [{
            "task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny", "queue": "graftq",
            "spec": spec or {"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny"},
        }], max_attempts=max_attempts)
    return database, job_id


def test_a_second_delivery_of_a_job_running_elsewhere_is_dropped(sqlite_url, artifacts_dir):
    from db.claims import claim_job
    from jobs.settings import Settings
    from worker.tasks import execute_job

    database, job_id = _recorded_job(sqlite_url)
    with database.begin() as session:
        claim_job(session, job_id, "first-worker", stale_after=60)
    settings = Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir)
    assert execute_job(job_id, settings, worker="second-worker") == "skipped"
    with database.read() as session:
        job = get_job(session, job_id)
        assert (job.status, job.worker, job.attempts) == ("running", "first-worker", 1)
    clear_cache()


def test_a_delivery_for_a_dead_job_out_of_attempts_fails_it_instead_of_running_it(sqlite_url, artifacts_dir):
    import datetime as dt

    from sqlalchemy import update

    from db import tables
    from db.claims import claim_job
    from db.tables import utcnow
    from jobs.settings import Settings
    from worker.tasks import execute_job

    database, job_id = _recorded_job(sqlite_url, max_attempts=1)
    with database.begin() as session:
        claim_job(session, job_id, "crashed-worker", stale_after=60)
        session.execute(update(tables.jobs).where(tables.jobs.c.id == job_id).values(heartbeat_at=utcnow() - dt.timedelta(hours=1)))
    assert execute_job(job_id, Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir), worker="w") == "skipped"
    with database.read() as session:
        job = get_job(session, job_id)
        assert job.status == "failed" and job.attempts == 1 and "attempt" in job.error
    clear_cache()


def test_a_stored_spec_that_no_longer_validates_fails_the_job_with_the_key(sqlite_url, artifacts_dir):
    from jobs.settings import Settings
    from worker.tasks import execute_job

    bad = {"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny", "lora": {"r": 0}}
    database, job_id = _recorded_job(sqlite_url, spec=bad)
    assert execute_job(job_id, Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir), worker="w") == "failed"
    with database.read() as session:
        job = get_job(session, job_id)
        assert job.status == "failed" and "key `lora.r`" in job.error
    clear_cache()


# --- how the task maps the pipeline's exceptions (the pipeline itself is replaced here: these tests
# --- are about the task's bookkeeping, which runs for real against SQLite and Celery's eager apply)


@pytest.fixture
def task_settings(sqlite_url, artifacts_dir):
    from jobs.celery_app import configure
    from jobs.settings import Settings

    settings = Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir, heartbeat_interval=1, stale_after=5)
    configure(settings)
    yield settings
    configure(Settings())
    clear_cache()


def _raise(error):
    def run_job(ctx):
        raise error

    return run_job


def test_a_transient_failure_is_retried_until_the_attempt_limit(task_settings, sqlite_url, monkeypatch):
    from worker import pipeline
    from worker.errors import TransientError
    from worker.tasks import run_job_task

    calls = []

    def flaky(ctx):
        calls.append(ctx.job_id)
        raise TransientError("lost the connection to redis")

    monkeypatch.setattr(pipeline, "run_job", flaky)
    database, job_id = _recorded_job(sqlite_url, max_attempts=2)
    run_job_task.apply(args=[job_id])
    with database.read() as session:
        job = get_job(session, job_id)
    assert len(calls) == 2 and job.attempts == 2
    assert job.status == "failed" and "no attempts left" in job.error


def test_a_job_interrupted_by_a_worker_shutdown_goes_back_to_the_queue_with_its_attempt(
        task_settings, sqlite_url, redis_url, redis_server, monkeypatch):
    import dataclasses

    from jobs.celery_app import configure
    from worker import tasks

    configure(dataclasses.replace(task_settings, broker_url=redis_url))
    monkeypatch.setattr(tasks.shutting_down, "is_set", lambda: True)  # as after SIGTERM
    from db.submission import create_batch

    database = get_database(sqlite_url)
    with database.begin() as session:  # a queue no worker of this module consumes
        _, [job_id] = create_batch(session, "handback", [{
            "task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny", "queue": "handback",
            "spec": {"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny"}}])
    assert tasks.execute_job(job_id, tasks.current_settings(), worker="w") == "interrupted"
    with database.read() as session:
        job = get_job(session, job_id)
    assert (job.status, job.attempts, job.claim_token) == ("queued", 0, None)
    assert "worker shutdown" in job.error and job.published_at is not None
    assert len(queued_messages(redis_server.client(), "handback")) == 1  # published again for another worker


@pytest.mark.parametrize("error, status, message", [
    ("JobError", "failed", "unknown target module"),
    ("JobCancelled", "cancelled", "cancelled on request"),
    ("RuntimeError", "failed", "RuntimeError: CUDA error: device-side assert triggered"),
])
def test_pipeline_exceptions_end_the_job_once_with_the_message(task_settings, sqlite_url, monkeypatch, error,
                                                               status, message):
    from worker import errors, pipeline
    from worker.tasks import run_job_task

    exception = {
        "JobError": errors.ConfigError("unknown target module 'qq'; the model's Linear modules are: q, k"),
        "JobCancelled": errors.JobCancelled("cancelled between steps"),
        "RuntimeError": RuntimeError("CUDA error: device-side assert triggered"),
    }[error]
    monkeypatch.setattr(pipeline, "run_job", _raise(exception))
    database, job_id = _recorded_job(sqlite_url)
    run_job_task.apply(args=[job_id])  # eager: a sticky CUDA error must not stop this process
    with database.read() as session:
        job = get_job(session, job_id)
    assert (job.status, job.attempts) == (status, 1)
    assert message in job.error
    if status == "failed":
        assert "Traceback" in job.traceback


@pytest.mark.slow
@pytest.mark.gpu
def test_a_gpu_job_runs_on_a_pinned_gpu_worker(tmp_path, dataset, redis_server):
    from worker.launcher import detect_gpus

    if not detect_gpus():
        pytest.skip("no NVIDIA GPU here (nvidia-smi -L lists none)")
    redis_server.start()
    redis_server.flush()
    pool = Pool(tmp_path, redis_server)
    pool.start_worker(gpus="all")
    try:
        batch_id = pool.submit(_write(tmp_path, "gpu.yaml", """
            base_model: random:t5-tiny
            jobs:
              - {task: on-gpu, extension: hybrid, device: cuda,
                 train: {dataset: data/reverse.jsonl, max_steps: 3, batch_size: 4, checkpoint_every: 0}}
              - {task: anywhere, kind: create, extension: lora}
        """))
        pool.wait_for("the GPU jobs", lambda: all(j.status in ("succeeded", "failed") for j in pool.jobs(batch_id)))
        for job in pool.jobs(batch_id):
            assert job.status == "succeeded", job.error
            assert job.device.startswith("cuda") and job.worker.startswith("graftq-gpu0@")
            assert job.peak_memory_mb is not None and job.peak_memory_mb > 0
    finally:
        assert pool.stop_worker() == 0
        clear_cache()
