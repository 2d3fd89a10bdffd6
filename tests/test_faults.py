"""Fault injection: the scenarios of docs/reliability.md against a real redis-server and real
`graftq worker` processes, each reporting its figure (`FIGURE <scenario>: key=value ...`).

    pytest -m faults -s tests/test_faults.py          # GRAFTQ_FAULT_REPORT=file also collects them

The cluster tests share one password-protected Redis with AOF on and two `graftq worker --gpus
none` processes with short intervals (heartbeat 1 s, stale after 4 s, reaper every 1 s, a
visibility timeout of 3 s: shorter than most jobs, so duplicate deliveries happen all the time).
Job lengths are sized from the measured training speed of this machine, not fixed step counts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from db.queries import get_job, jobs_of_batch
from db.session import clear_cache, get_database
from db.tables import utcnow
from jobs.cli import cli
from tests.conftest import ROOT, RedisServer, graftq_argv
from tests.faults_report import figure

pytestmark = pytest.mark.faults

SHIM = Path(__file__).resolve().parent / "fault_shim"
CRASH_TASK = "crash-me"
CRASH_AFTER_OUTCOME_TASK = "dies-after-commit"
PASSWORD = "fault-test-secret"
FINISHED = ("succeeded", "failed", "cancelled")
WORDS = ["abc", "xyz", "cat", "dog", "sun", "map", "red", "fox", "owl", "bee", "ink", "jar"]
CLAIMED = re.compile(r"job ([0-9a-f]{16}) \(batch [0-9a-f]{16}\) claimed by")
SUCCEEDED = re.compile(r"job ([0-9a-f]{16}) succeeded")
DUPLICATE = re.compile(r"job ([0-9a-f]{16}) not run: (?:running on .* \(a duplicate delivery\)|already \w+)")


class SecuredRedis(RedisServer):
    """The conftest's redis-server with a password (`requirepass`), as docker-compose runs it."""

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def client(self):  # noqa: ANN201
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, password=PASSWORD, socket_timeout=5)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
                time.sleep(0.05)
                return b"+PONG" in sock.recv(64)
        except OSError:
            return False


class Worker:
    """One `graftq worker --gpus none` process (the launcher) and its log."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path):
        self.process = process
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None


class Cluster:
    def __init__(self, root: Path, redis: SecuredRedis):
        self.root = root
        self.redis = redis
        self.database_url = f"sqlite:///{root / 'graftq.db'}"
        self.artifacts = root / "artifacts"
        self.env = dict(os.environ)
        self.env.update(
            GRAFTQ_DATABASE_URL=self.database_url, GRAFTQ_BROKER_URL=redis.url, GRAFTQ_ARTIFACTS_DIR=str(self.artifacts),
            GRAFTQ_HEARTBEAT_INTERVAL="1", GRAFTQ_STALE_AFTER="4", GRAFTQ_VISIBILITY_TIMEOUT="3",
            GRAFTQ_MAX_ATTEMPTS="3", GRAFTQ_TEST_CRASH_TASK=CRASH_TASK,
            GRAFTQ_TEST_CRASH_AFTER_OUTCOME=CRASH_AFTER_OUTCOME_TASK, OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(SHIM), str(ROOT)]),
        )
        self.workers: list[Worker] = []
        self.step_seconds = 0.05

    # -- workers ------------------------------------------------------------------------------
    def start_worker(self, gpus: str = "none") -> Worker:
        log = self.root / f"worker{len(self.workers)}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(graftq_argv("worker", "--gpus", gpus, "--reap-interval", "1"),
                                       cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        worker = Worker(process, log)
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: Worker, count: int = 1, timeout: float = 120) -> None:
        def ready() -> bool:
            assert worker.alive(), f"graftq worker exited ({worker.process.returncode}):\n{worker.text()[-4000:]}"
            return worker.text().count(" ready.") >= count

        self.wait_for("a worker process to be ready", ready, timeout)

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.alive()]

    def ensure_workers(self, count: int = 2) -> None:
        started = [self.start_worker() for _ in range(count - len(self.live_workers()))]
        for worker in started:
            self.wait_ready(worker)

    def launcher_of(self, pid: int) -> Worker:
        """The `graftq worker` whose Celery process has this pid."""
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        [worker] = [w for w in self.workers if w.process.pid == ppid]
        return worker

    def stop_all(self) -> None:
        for worker in self.live_workers():
            worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    def logs(self) -> str:
        return "\n".join(w.text() for w in self.workers)

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def count(self, pattern: re.Pattern[str]) -> Counter[str]:
        return Counter(pattern.findall(self.logs()))

    # -- jobs ---------------------------------------------------------------------------------
    def submit(self, name: str, jobs: list[str], train: str = "") -> str:
        body = textwrap.dedent(f"""
            batch: {name}
            base_model: random:t5-tiny
            defaults:
              lora: {{r: 4, alpha: 8}}
              train: {{dataset: data/reverse.jsonl, batch_size: 2, max_length: 16, eval_fraction: 0.2{train}}}
            jobs:
        """) + "".join(f"  - {job}\n" for job in jobs)
        path = self.root / f"{name}.yaml"
        path.write_text(body)
        result = CliRunner().invoke(cli, ["--database-url", self.database_url, "--broker-url", self.redis.url,
                                          "--artifacts-dir", str(self.artifacts), "submit", str(path)])
        assert result.exit_code == 0, result.output
        return result.stdout.strip().splitlines()[-1]

    def jobs(self, batch_id: str):
        with get_database(self.database_url).read() as session:
            return jobs_of_batch(session, batch_id)

    def job(self, job_id: str):
        with get_database(self.database_url).read() as session:
            return get_job(session, job_id)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\nworker logs:\n{self.log_tail()}")

    def wait_finished(self, batch_id: str, timeout: float = 180) -> list:
        self.wait_for(f"batch {batch_id} to finish",
                      lambda: all(j.status in FINISHED for j in self.jobs(batch_id)), timeout)
        return self.jobs(batch_id)

    def steps_for(self, seconds: float) -> int:
        """Training steps that take about `seconds` on this machine now."""
        return max(20, min(20_000, round(seconds / self.step_seconds)))

    def resumed_from(self, job) -> int:
        return json.loads((Path(job.job_dir) / "job.json").read_text())["metrics"].get("resumed_from_step") or 0


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory):
    server = SecuredRedis(tmp_path_factory.mktemp("fault-redis"))
    if not Path(server.binary).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server); fault tests need it")
    # As docs/reliability.md asks of a production Redis: AOF every second, no eviction, a password.
    server.extra_args = ["--appendfsync", "everysec", "--maxmemory-policy", "noeviction", "--requirepass", PASSWORD]
    server.start(appendonly=True)
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, fault_redis):
    root = tmp_path_factory.mktemp("cluster")
    (root / "data").mkdir()
    (root / "data" / "reverse.jsonl").write_text(
        "".join(json.dumps({"input": w, "target": w[::-1]}) + "\n" for w in WORDS * 3))
    cluster = Cluster(root, fault_redis)
    try:
        cluster.ensure_workers(2)
        # Warm both workers up (the first job of a process builds the base model) and measure.
        batch_id = cluster.submit("calibrate", ["{task: warm, extension: lora}"] * 2, ", max_steps: 60")
        jobs = cluster.wait_finished(batch_id)
        assert all(j.status == "succeeded" for j in jobs), [(j.status, j.error) for j in jobs]
        cluster.step_seconds = max(j.train_seconds / j.steps for j in jobs)
        yield cluster
    finally:
        cluster.stop_all()
        clear_cache()


# --- scenarios on the cluster ---------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command: what a pickle-accepting worker would execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_pickled_message_is_refused_and_its_payload_never_runs(cluster):
    from kombu import Connection

    cluster.ensure_workers(2)
    marker = cluster.root / "payload-ran"
    with Connection(cluster.redis.url) as connection:
        connection.Producer().publish(
            _Payload(marker), serializer="pickle", routing_key="graftq", exchange="",
            headers={"task": "graftq.run_job", "id": "pickled-1", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    cluster.wait_for("the pickled message to be taken off the queue",
                     lambda: cluster.redis.queue_lengths()["graftq"] == 0, 60)
    time.sleep(1)
    figure("pickled_message", payloads_executed=int(marker.exists()))
    assert not marker.exists()
    assert len(cluster.live_workers()) == 2  # the workers are still serving
    assert "Refusing to deserialize untrusted content of type pickle" in cluster.logs()


@pytest.mark.slow
def test_a_job_longer_than_the_visibility_timeout_runs_once(cluster):
    cluster.ensure_workers(2)
    # ~15 s of training against a 3 s visibility timeout: Redis hands the message to the idle
    # worker again and again while the first one still runs it.
    batch_id = cluster.submit("visibility", ["{task: long, extension: lora}"],
                              f", max_steps: {cluster.steps_for(15)}, checkpoint_every: 0")
    [job] = cluster.jobs(batch_id)
    cluster.wait_for("the second delivery to be recognised", lambda: cluster.count(DUPLICATE)[job.id] >= 1, 120)
    [job] = cluster.wait_finished(batch_id)
    executions = cluster.count(CLAIMED)[job.id]
    dropped = cluster.count(DUPLICATE)[job.id]
    figure("visibility_timeout", executions_per_job=executions, duplicate_deliveries_dropped=dropped)
    assert job.status == "succeeded" and job.attempts == 1, job.error
    assert executions == 1 and cluster.count(SUCCEEDED)[job.id] == 1


@pytest.mark.slow
def test_redis_stopped_and_restarted_while_jobs_run_loses_nothing(cluster):
    cluster.ensure_workers(2)
    jobs = ["{task: fit, extension: lora}"] * 2 + ["{task: build, kind: create, extension: hybrid}"] * 6
    batch_id = cluster.submit("redis-restart", jobs, f", max_steps: {cluster.steps_for(6)}, checkpoint_every: 0")
    cluster.wait_for("a job to be running", lambda: any(j.status == "running" for j in cluster.jobs(batch_id)))
    cluster.redis.stop()  # SIGTERM: Redis writes its AOF and exits
    down = time.monotonic()
    queued_while_down = sum(j.status == "queued" for j in cluster.jobs(batch_id))
    time.sleep(4)
    cluster.redis.start(appendonly=True)
    jobs = cluster.wait_finished(batch_id, 240)
    finished = time.monotonic() - down
    lost = sum(j.status != "succeeded" for j in jobs)
    executions = cluster.count(CLAIMED)
    duplicated = sum(max(0, executions[j.id] - 1) for j in jobs)
    figure("redis_restart", lost=lost, duplicated=duplicated, queued_while_down=queued_while_down,
           seconds_to_finish=finished)
    assert queued_while_down > 0  # the restart really hit queued jobs, not only running ones
    assert lost == 0, [(j.task, j.status, j.error) for j in jobs]
    assert duplicated == 0 and all(j.attempts == 1 for j in jobs)


@pytest.mark.slow
def test_a_worker_killed_mid_training_loses_nothing_and_the_job_resumes_from_its_checkpoint(cluster):
    cluster.ensure_workers(2)
    steps = cluster.steps_for(6)
    every = max(2, steps // 10)
    jobs = ["{task: victim, extension: lora}"] + [
        "{task: short, extension: lora, train: {max_steps: 3}}" if i % 3 == 0 else
        "{task: stats, kind: create, extension: hybrid}" for i in range(9)]
    batch_id = cluster.submit("sigkill", jobs, f", max_steps: {steps}, checkpoint_every: {every}")
    victim_id = cluster.jobs(batch_id)[0].id
    cluster.wait_for("the victim to train past two checkpoints",
                     lambda: (cluster.job(victim_id).progress_step or 0) > 2 * every, 120)
    victim = cluster.job(victim_id)
    pid = int(victim.worker.rsplit(":", 1)[1])
    launcher = cluster.launcher_of(pid)
    # The whole worker dies at once (the machine went away): the Celery process, then the
    # launcher before it could restart it or pass anything on.
    launcher.process.send_signal(signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    launcher.process.kill()
    launcher.process.wait()
    killed_at = utcnow()
    cluster.ensure_workers(2)  # "start another worker"
    jobs = cluster.wait_finished(batch_id, 240)
    victim = next(j for j in jobs if j.id == victim_id)
    recovery = (victim.started_at - killed_at).total_seconds()  # until its second attempt began
    succeeded = cluster.count(SUCCEEDED)
    lost = sum(j.status != "succeeded" for j in jobs)
    duplicated = sum(max(0, succeeded[j.id] - 1) for j in jobs)
    resumed = cluster.resumed_from(victim) if victim.status == "succeeded" else 0
    figure("sigkill_mid_training", lost=lost, duplicated=duplicated, recovery_seconds=recovery,
           resumed_from_step=resumed, steps=steps)
    assert lost == 0, [(j.task, j.status, j.error) for j in jobs]
    assert duplicated == 0 and all(succeeded[j.id] == 1 for j in jobs)
    assert victim.attempts == 2 and all(j.attempts == 1 for j in jobs if j.id != victim_id)
    assert int(victim.worker.rsplit(":", 1)[1]) != pid
    assert resumed >= 2 * every and resumed % every == 0 and victim.steps == steps
    assert recovery < 60  # stale after 4 s + the reaper's 1 s, plus a new worker's start; not the 1 h timeout


@pytest.mark.slow
def test_a_job_that_crashes_its_worker_every_time_is_failed_at_its_attempt_limit(cluster):
    cluster.ensure_workers(2)
    jobs = [f"{{task: {CRASH_TASK}, kind: create, extension: lora}}"] + [
        "{task: good, extension: lora, train: {max_steps: 5}}" if i % 3 == 0 else
        "{task: good, kind: create, extension: layer}" for i in range(9)]
    submitted = time.monotonic()
    batch_id = cluster.submit("crashes", jobs, ", checkpoint_every: 0")
    crash_id = cluster.jobs(batch_id)[0].id
    cluster.wait_for("the crashing job to be quarantined", lambda: cluster.job(crash_id).status in FINISHED, 240)
    quarantined = time.monotonic() - submitted
    jobs = cluster.wait_finished(batch_id, 120)
    crash = next(j for j in jobs if j.id == crash_id)
    figure("crash_every_time", attempts=crash.attempts, time_to_quarantine_seconds=quarantined,
           good_succeeded=sum(j.status == "succeeded" for j in jobs if j.id != crash_id))
    assert crash.status == "failed" and crash.attempts == 3, (crash.status, crash.attempts, crash.error)
    assert "during every attempt" in crash.error and "attempt limit" in crash.error
    assert cluster.count(CLAIMED)[crash_id] == 3  # never a fourth run
    assert all(j.status == "succeeded" and j.attempts == 1 for j in jobs if j.id != crash_id), [
        (j.task, j.status, j.attempts, j.error) for j in jobs]
    assert "restarting it" in cluster.logs()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_hands_the_running_job_to_another_worker(cluster):
    cluster.ensure_workers(2)
    steps = cluster.steps_for(10)
    # checkpoint_every larger than the job: the only checkpoint is the one the shutdown writes.
    batch_id = cluster.submit("sigterm", ["{task: handed-over, extension: lora}"],
                              f", max_steps: {steps}, checkpoint_every: {steps}")
    [job] = cluster.jobs(batch_id)
    cluster.wait_for("the job to be training", lambda: (cluster.job(job.id).progress_step or 0) > 5, 120)
    first = cluster.job(job.id)
    launcher = cluster.launcher_of(int(first.worker.rsplit(":", 1)[1]))
    signalled = time.monotonic()
    launcher.process.send_signal(signal.SIGTERM)
    code = launcher.process.wait(timeout=60)
    stop_seconds = time.monotonic() - signalled
    [job] = cluster.wait_finished(batch_id, 120)
    resumed = cluster.resumed_from(job) if job.status == "succeeded" else 0
    figure("sigterm_handback", stop_seconds=stop_seconds, resumed_from_step=resumed, attempts=job.attempts,
           steps=steps)
    assert code == 0
    assert stop_seconds < 30  # not the whole job: it stops at its next step
    assert job.status == "succeeded" and job.steps == steps, job.error
    assert job.attempts == 1  # the interrupted attempt was given back
    assert job.worker != first.worker and resumed >= first.progress_step
    assert "the worker is shutting down" in launcher.text()


@pytest.mark.slow
def test_a_deterministic_job_error_fails_once_at_the_worker_naming_the_key(cluster):
    # submit refuses what it can see (e.g. an unknown target module); a dataset line that is not JSON
    # is only found by the worker that reads the file
    (cluster.root / "data" / "broken.jsonl").write_text('{"input": "ab", "target": "ba"}\n{"input": "cd",\n')
    batch_id = cluster.submit("broken-data", ["{task: t, extension: lora, train: {dataset: data/broken.jsonl}}"])
    cluster.ensure_workers(1)
    [job] = cluster.wait_finished(batch_id, 120)
    figure("deterministic_job_error", attempts=job.attempts, retried=int(job.attempts > 1))
    assert job.status == "failed" and job.attempts == 1
    assert "train.dataset" in job.error and "broken.jsonl line 2 is not valid JSON" in job.error


def _parent_and_children(cluster: Cluster, parent_task: str, children: int, steps: int | None = None) -> list[str]:
    """Submit a parent and `children` jobs that need it (listed first); returns [parent, *children] ids."""
    from jobs.batch import Batch
    from jobs.settings import Settings
    from jobs.spec import JobSpec
    from jobs.submit import submit_batch

    common = {"base_model": "random:t5-tiny", "extension": "lora", "lora": {"r": 4, "alpha": 8}}
    if steps is None:
        parent = JobSpec.model_validate({**common, "task": parent_task, "kind": "create", "name": "parent"})
    else:
        parent = JobSpec.model_validate({**common, "task": parent_task, "name": "parent", "train": {
            "dataset": str(cluster.root / "data" / "reverse.jsonl"), "batch_size": 2, "max_length": 16,
            "eval_fraction": 0.2, "max_steps": steps, "checkpoint_every": 0}})
    child = JobSpec.model_validate({**common, "task": "child", "kind": "create", "needs": ["parent"]})
    batch = Batch("dependants", None, "random:t5-tiny", jobs=[*[child] * children, parent],
                  needs=[*[[children]] * children, []])
    settings = Settings(database_url=cluster.database_url, broker_url=cluster.redis.url,
                        artifacts_dir=cluster.artifacts)
    submitted = submit_batch(batch, settings, get_database(cluster.database_url))
    assert len(submitted.waiting) == children
    return [submitted.job_ids[-1], *submitted.job_ids[:-1]]


def _children_figures(cluster: Cluster, parent_id: str, child_ids: list[str]) -> tuple[int, int, list]:
    children = [cluster.job(job_id) for job_id in child_ids]
    claims = cluster.count(CLAIMED)
    lost = sum(child.status != "succeeded" for child in children)
    run_twice = sum(claims[child.id] > 1 or child.attempts > 1 for child in children)
    return lost, run_twice, children


@pytest.mark.slow
def test_a_worker_killed_right_after_a_parents_outcome_commit_loses_no_child(cluster):
    cluster.ensure_workers(2)
    parent_id, *child_ids = _parent_and_children(cluster, CRASH_AFTER_OUTCOME_TASK, 3)
    cluster.wait_for("the children to finish", lambda: all(
        cluster.job(job_id).status in FINISHED for job_id in child_ids), 180)
    parent = cluster.job(parent_id)
    lost, run_twice, children = _children_figures(cluster, parent_id, child_ids)
    published = min(child.published_at for child in children)
    figure("sigkill_after_parent_outcome", children_lost=lost, children_run_twice=run_twice,
           seconds_to_publish=(published - parent.finished_at).total_seconds())
    assert parent.status == "succeeded" and parent.attempts == 1 and cluster.count(CLAIMED)[parent_id] == 1
    assert lost == 0 and run_twice == 0, [(c.status, c.attempts, c.error) for c in children]
    assert all(child.started_at >= parent.finished_at for child in children)
    # The worker died before publishing them: the reaper did.
    assert f"job {parent_id}: published" not in cluster.logs()
    assert "published 3 queued job(s) that had no message on the broker" in cluster.logs()
    cluster.wait_for("the killed worker process to be replaced", lambda: len(cluster.live_workers()) == 2, 60)


@pytest.mark.slow
def test_children_of_a_parent_that_finishes_while_the_broker_is_down_run_once_it_is_back(cluster):
    cluster.ensure_workers(2)
    parent_id, *child_ids = _parent_and_children(cluster, "parent-while-down", 3, cluster.steps_for(4))
    cluster.wait_for("the parent to be training", lambda: (cluster.job(parent_id).progress_step or 0) > 0, 120)
    cluster.redis.stop()
    try:
        cluster.wait_for("the parent to succeed", lambda: cluster.job(parent_id).status in FINISHED, 120)
        time.sleep(2)  # the worker's publish fails; the reaper's too, while the broker is away
        still_unpublished = sum(cluster.job(job_id).published_at is None for job_id in child_ids)
    finally:
        cluster.redis.start(appendonly=True)
    back = utcnow()
    cluster.wait_for("the children to finish", lambda: all(
        cluster.job(job_id).status in FINISHED for job_id in child_ids), 180)
    lost, run_twice, children = _children_figures(cluster, parent_id, child_ids)
    figure("broker_down_when_parent_finishes", children_lost=lost, children_run_twice=run_twice,
           unpublished_while_down=still_unpublished,
           seconds_after_broker_back=(max(child.finished_at for child in children) - back).total_seconds())
    assert cluster.job(parent_id).status == "succeeded"
    assert still_unpublished == 3  # the broker really was down when they were released
    assert lost == 0 and run_twice == 0, [(c.status, c.attempts, c.error) for c in children]


# --- scenarios without workers --------------------------------------------------------------------


def _queued_without_message(database_url: str) -> int:
    path = database_url.removeprefix("sqlite:///")
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT count(*) FROM jobs WHERE status = 'queued' AND published_at IS NULL").fetchone()[0]


def _rows(database_url: str) -> int:
    path = database_url.removeprefix("sqlite:///")
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path) as connection:
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return connection.execute("SELECT count(*) FROM jobs").fetchone()[0] if "jobs" in tables else 0


def _many_jobs_batch(path: Path, count: int) -> Path:
    path.write_text("base_model: random:t5-tiny\njobs:\n" + "  - {task: t, kind: create, extension: lora}\n" * count)
    return path


@pytest.mark.slow
def test_submit_with_redis_down_or_dying_leaves_no_queued_row_without_a_message(tmp_path, redis_server, graftq_env):
    batch = _many_jobs_batch(tmp_path / "b.yaml", 3000)
    env = {**graftq_env, "GRAFTQ_BROKER_URL": redis_server.url}
    database_url = env["GRAFTQ_DATABASE_URL"]

    redis_server.stop()
    down = subprocess.run(graftq_argv("submit", str(batch)), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    redis_server.start()
    assert down.returncode == 1 and "cannot reach the broker" in down.stderr and "Traceback" not in down.stderr
    assert _rows(database_url) == 0

    # Redis killed while the 3000 messages go out: whatever was not sent must not stay `queued`.
    redis_server.flush()
    submit = subprocess.Popen(graftq_argv("submit", str(batch)), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _rows(database_url) == 0 and time.monotonic() < deadline and submit.poll() is None:
        time.sleep(0.002)
    redis_server.stop(kill=True)
    _, stderr = submit.communicate(timeout=120)
    redis_server.start()
    orphaned = _queued_without_message(database_url)
    with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
        unsent = connection.execute("SELECT count(*) FROM jobs WHERE status = 'failed'").fetchone()[0]
    figure("broker_down_at_submit", exit_status=down.returncode, rows_written=0, orphaned_rows=orphaned,
           killed_midway_exit_status=submit.returncode, killed_midway_unsent_marked_failed=unsent)
    assert orphaned == 0
    if submit.returncode != 0:  # the kill landed while publishing
        assert "marked failed" in stderr or "cannot reach the broker" in stderr, stderr
        assert "Traceback" not in stderr


def _race(url: str, job_ids: list[str], worker: str, results) -> None:  # runs in a child process
    from sqlalchemy.exc import OperationalError

    from db.claims import claim_job, finish_job, heartbeat, record_progress
    from db.session import get_database

    database = get_database(url)
    claimed, lock_errors = [], 0
    order = list(job_ids)
    random.Random(worker).shuffle(order)
    for job_id in order:
        try:
            with database.begin() as session:
                claim = claim_job(session, job_id, worker, stale_after=60)
            if claim is None:
                continue
            token = claim.token
            claimed.append(job_id)
            for step in range(1, 11):
                with database.begin() as session:
                    record_progress(session, job_id, token, step, 10, 1.0 / step)
                with database.begin() as session:
                    heartbeat(session, job_id, token)
            with database.begin() as session:
                finish_job(session, job_id, token, stats={}, metrics={"steps": 10}, device="cpu", dtype="f32",
                           versions={}, job_dir="/x", loss_curve=[(s, "train", 1.0 / s) for s in range(1, 11)])
        except OperationalError as error:
            lock_errors += "locked" in str(error)
    results.put((worker, claimed, lock_errors))


@pytest.mark.slow
def test_eight_processes_racing_for_the_same_jobs_in_one_sqlite_file(tmp_path):
    from db.queries import loss_curve
    from db.submission import create_batch

    url = f"sqlite:///{tmp_path / 'race.db'}"
    database = get_database(url)
    rows = [{"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny", "queue": "graftq",
             "spec": {}}] * 48
    with database.begin() as session:
        batch_id, ids = create_batch(session, "race", rows)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    # Every process goes for every job, in its own order: claims collide all the time.
    processes = [context.Process(target=_race, args=(url, ids, f"w{i}", results)) for i in range(8)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    claims = Counter(job_id for _, claimed, _ in outcomes for job_id in claimed)
    lock_errors = sum(errors for _, _, errors in outcomes)
    with database.read() as session:
        jobs = jobs_of_batch(session, batch_id)
        curves = {job.id: loss_curve(session, job.id) for job in jobs}
    lost_updates = sum(job.status != "succeeded" or job.steps != 10 or job.progress_step != 10 or len(curves[job.id]) != 10
                       for job in jobs)
    figure("sqlite_eight_writers", lock_errors=lock_errors, lost_updates=lost_updates,
           double_claims=sum(n - 1 for n in claims.values()), jobs=len(jobs))
    assert lock_errors == 0 and lost_updates == 0
    assert sorted(claims) == sorted(ids) and set(claims.values()) == {1}
    assert all(job.attempts == 1 for job in jobs)
    clear_cache()


@pytest.mark.slow
def test_artifacts_are_absent_or_complete_after_sigkill_while_saving(tmp_path):
    from worker.pipeline import load_job_model

    root = tmp_path / "artifacts"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    kills = 8
    run = subprocess.run([sys.executable, "-m", "tests.fault_workload", str(root), str(kills), "7"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    batch_dir = root / "killedwhilesaving"
    complete = [p for p in batch_dir.iterdir() if not p.name.startswith(".")]
    interrupted_saves = [p for p in batch_dir.iterdir() if ".tmp-" in p.name]
    corrupted = []
    for job_dir in complete:
        try:
            model, _, info = load_job_model(job_dir)
            assert info["job_id"] == job_dir.name
            del model
        except Exception as error:  # any failure to load is a corrupted artifact
            corrupted.append(f"{job_dir.name}: {error}")
    figure("sigkill_while_saving", corrupted_artifacts=len(corrupted), complete=len(complete), kills=kills,
           kills_mid_save=len(interrupted_saves))
    assert corrupted == []
    assert complete  # the children did save between kills


BAD_TASK_NAMES = ["../x", "/etc/x", "a/../../b", "a\x00b", "x" * 500]


def _tree(root: Path, exclude: Path) -> set[Path]:
    return {p for p in root.rglob("*") if exclude not in p.parents and p != exclude}


def test_task_names_that_could_escape_the_artifacts_dir_write_nothing_anywhere(tmp_path, sqlite_url):
    from db.submission import create_batch
    from jobs.settings import Settings
    from worker.tasks import execute_job

    artifacts = tmp_path / "work" / "artifacts"
    artifacts.mkdir(parents=True)
    before = _tree(tmp_path, artifacts)
    refused = 0
    for name in BAD_TASK_NAMES:
        # `graftq run` (which writes artifacts itself) refuses the batch before anything is recorded.
        batch = tmp_path / "work" / "bad.yaml"
        batch.write_text(json.dumps({"base_model": "random:t5-tiny",
                                     "jobs": [{"task": name, "kind": "create", "extension": "hybrid"}]}))
        result = CliRunner().invoke(cli, ["--database-url", sqlite_url, "--artifacts-dir", str(artifacts),
                                          "run", str(batch)])
        refused += result.exit_code != 0 and "key `task`" in result.output
        batch.unlink()
    # A row written behind graftq's back: the worker re-validates the spec and writes nothing.
    database = get_database(sqlite_url)
    settings = Settings(database_url=sqlite_url, artifacts_dir=artifacts)
    worker_refused = 0
    for name in BAD_TASK_NAMES:
        with database.begin() as session:
            _, [job_id] = create_batch(session, "tampered", [{
                "task": "t", "kind": "create", "extension": "hybrid", "base_model": "random:t5-tiny", "queue": "graftq",
                "spec": {"task": name, "kind": "create", "extension": "hybrid", "base_model": "random:t5-tiny"}}])
        assert execute_job(job_id, settings, worker="w") == "failed"
        with database.read() as session:
            worker_refused += "key `task`" in get_job(session, job_id).error
    after = _tree(tmp_path, artifacts) - {Path(sqlite_url.removeprefix("sqlite:///"))}
    outside = sorted(str(p) for p in after - before if not p.name.startswith("graftq.db"))
    figure("bad_task_names", rejected=refused, worker_rejected=worker_refused, names=len(BAD_TASK_NAMES),
           files_outside_root=len(outside), files_in_root=sum(1 for _ in artifacts.rglob("*")))
    assert refused == worker_refused == len(BAD_TASK_NAMES)
    assert outside == [] and not any(artifacts.rglob("*"))
    clear_cache()


INVALID = {
    "unknown key": ("jobs: [{task: a, kind: create, extension: lora, colour: red}]", "colour"),
    "wrong type": ("jobs: [{task: a, kind: create, extension: lora, lora: {r: eight}}]", "lora.r"),
    "r <= 0": ("jobs: [{task: a, kind: create, extension: lora, lora: {r: 0}}]", "lora.r"),
    "missing dataset": ("jobs: [{task: a, extension: lora, train: {dataset: gone.jsonl}}]", "train.dataset"),
}


def test_invalid_batch_files_write_no_row_and_no_message(tmp_path, redis_url, redis_server, graftq_env):
    env = {**graftq_env, "GRAFTQ_BROKER_URL": redis_url}
    written, clear = 0, 0
    for case, (body, key) in INVALID.items():
        path = tmp_path / "invalid.yaml"
        path.write_text("base_model: random:t5-tiny\n" + body.replace("jobs: [", "jobs: [{task: ok, kind: create, "
                                                                                    "extension: layer}, "))
        result = subprocess.run(graftq_argv("submit", str(path)), cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=60)
        output = result.stdout + result.stderr
        clear += (result.returncode != 0 and "job 1 (task" in output and f"key `{key}`" in output
                  and "Traceback" not in output)
        written += _rows(env["GRAFTQ_DATABASE_URL"]) + sum(redis_server.queue_lengths().values())
        assert result.returncode != 0 and f"key `{key}`" in output, (case, output)
    figure("invalid_batch_files", rows_and_messages_written=written, clear_errors=clear, cases=len(INVALID))
    assert written == 0 and clear == len(INVALID)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_out_of_memory_fails_one_job_with_advice_and_the_worker_goes_on(tmp_path, redis_server):
    from worker.launcher import detect_gpus

    if not detect_gpus():
        pytest.skip("no NVIDIA GPU here (nvidia-smi -L lists none): CUDA out-of-memory needs one")
    redis_server.start()
    redis_server.flush()
    cluster = Cluster(tmp_path, redis_server)  # type: ignore[arg-type]
    cluster.env["GRAFTQ_BROKER_URL"] = redis_server.url
    (tmp_path / "data").mkdir()
    long_rows = [{"input": "a" * 4000, "target": "b" * 4000}] * 600
    (tmp_path / "data" / "reverse.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    cluster.wait_ready(cluster.start_worker(gpus="0"))
    try:
        batch_id = cluster.submit("oom", [
            "{task: huge, extension: hybrid, base_model: 'random:flan-t5-small', device: cuda, "
            "train: {batch_size: 512, max_length: 4096, max_steps: 2}}",
            "{task: after, extension: lora, device: cuda, train: {max_steps: 3}}",
        ], ", checkpoint_every: 0")
        jobs = cluster.wait_finished(batch_id, 300)
        huge, after = jobs
        figure("cuda_oom", recovered=int(after.status == "succeeded" and after.worker == huge.worker))
        assert huge.status == "failed" and "lower train.batch_size" in huge.error and huge.attempts == 1
        assert after.status == "succeeded" and after.worker == huge.worker  # the same process went on
    finally:
        cluster.stop_all()
        clear_cache()


def test_the_fault_suite_reports_figures_in_one_line_format(tmp_path, monkeypatch):
    report = tmp_path / "figures.txt"
    monkeypatch.setenv("GRAFTQ_FAULT_REPORT", str(report))
    line = figure("format_check", lost=0, recovery_seconds=4.2)
    assert line == "FIGURE format_check: lost=0 recovery_seconds=4.20"
    assert report.read_text() == line + "\n"
    from tests import faults_report

    faults_report.FIGURES.remove(line)


# --- packed training (`graftq worker --pack`) -------------------------------------------------------


def _start_packing_worker(cluster: Cluster, pack: int) -> Worker:
    log = cluster.root / f"worker{len(cluster.workers)}-pack.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            graftq_argv("worker", "--gpus", "none", "--reap-interval", "1", "--pack", str(pack)),
            cwd=cluster.root, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    worker = Worker(process, log)
    cluster.workers.append(worker)
    cluster.wait_ready(worker)
    return worker


def _only_a_packing_worker(cluster: Cluster, pack: int) -> Worker:
    """Stop the cluster's workers; start one `--pack` worker, so that it alone takes the next batch."""
    cluster.stop_all()
    return _start_packing_worker(cluster, pack)


def _packed_and_running(cluster: Cluster, batch_id: str, count: int, min_step: int = 0) -> bool:
    jobs = cluster.jobs(batch_id)
    return (sum(j.status == "running" and (j.progress_step or 0) > min_step for j in jobs) == count
            and len({j.worker for j in jobs}) == 1)


@pytest.mark.slow
def test_a_killed_packing_worker_loses_no_job_of_its_pack_and_runs_none_twice(cluster):
    _only_a_packing_worker(cluster, 3)
    steps = cluster.steps_for(5)
    every = max(2, steps // 10)
    jobs = [f"{{task: packed{i}, extension: lora, train: {{seed: {i}}}}}" for i in range(3)]
    batch_id = cluster.submit("pack-sigkill", jobs, f", max_steps: {steps}, checkpoint_every: {every}")
    cluster.wait_for("the three jobs to train packed past two checkpoints",
                     lambda: _packed_and_running(cluster, batch_id, 3, 2 * every), 180)
    pid = int(cluster.jobs(batch_id)[0].worker.rsplit(":", 1)[1])
    launcher = cluster.launcher_of(pid)
    launcher.process.send_signal(signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    launcher.process.kill()
    launcher.process.wait()
    cluster.ensure_workers(1)  # a plain worker: each job resumes alone from its packed checkpoint
    jobs = cluster.wait_finished(batch_id, 300)
    succeeded = cluster.count(SUCCEEDED)
    lost = sum(j.status != "succeeded" for j in jobs)
    duplicated = sum(max(0, succeeded[j.id] - 1) for j in jobs)
    resumed = [cluster.resumed_from(j) if j.status == "succeeded" else 0 for j in jobs]
    figure("sigkill_packing_worker", lost=lost, duplicated=duplicated, min_resumed_from_step=min(resumed),
           steps=steps)
    assert lost == 0, [(j.task, j.status, j.error) for j in jobs]
    assert duplicated == 0 and all(succeeded[j.id] == 1 for j in jobs)
    assert all(j.attempts == 2 and j.steps == steps for j in jobs)
    assert all(r >= 2 * every and r % every == 0 for r in resumed), resumed


@pytest.mark.slow
def test_cancelling_one_packed_job_cancels_only_it(cluster):
    worker = _only_a_packing_worker(cluster, 3)
    steps = cluster.steps_for(4)
    jobs = [f"{{task: pack{i}, extension: lora, train: {{seed: {i}}}}}" for i in range(3)]
    batch_id = cluster.submit("pack-cancel", jobs, f", max_steps: {steps}, checkpoint_every: 0")
    cluster.wait_for("the three jobs to train packed", lambda: _packed_and_running(cluster, batch_id, 3), 180)
    victim = cluster.jobs(batch_id)[1]
    result = CliRunner().invoke(cli, ["--database-url", cluster.database_url, "--broker-url", cluster.redis.url,
                                      "cancel", victim.id])
    assert result.exit_code == 0, result.output
    jobs = cluster.wait_finished(batch_id, 180)
    statuses = {j.id: j.status for j in jobs}
    figure("cancel_one_packed_job", cancelled=sum(s == "cancelled" for s in statuses.values()),
           succeeded=sum(s == "succeeded" for s in statuses.values()))
    assert statuses.pop(victim.id) == "cancelled"
    assert set(statuses.values()) == {"succeeded"}, [(j.task, j.status, j.error) for j in jobs]
    others = [j for j in jobs if j.id != victim.id]
    assert all(victim.id in j.packed_with and len(j.packed_with) == 2 for j in others)
    assert all(j.steps == steps and j.attempts == 1 for j in others)
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=60)
