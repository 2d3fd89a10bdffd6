"""One job on several devices: 2 gloo ranks on the CPU train what one process trains, rank 0 owns the
checkpoints, a killed rank sends the job back to the queue, and it resumes from rank 0's checkpoint."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from db.queries import get_job
from db.session import clear_cache, get_database
from db.submission import create_batch
from jobs.settings import Settings
from jobs.spec import JobSpec
from worker import distributed
from worker.pipeline import JobContext, run_job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def _spec(gpus: int, **train: object) -> JobSpec:
    # no dropout: the ranks draw their own random numbers, so only a dropout-free run can match
    return JobSpec(task="t", extension="lora", base_model="random:t5-tiny", device="cpu", lora={"dropout": 0.0},
                   resources={"gpus": gpus},
                   train={"dataset": str(EXAMPLES / "reverse.jsonl"), "batch_size": 8, "grad_accum_steps": 2,
                          "eval_fraction": 0.05, "learning_rate": 1e-2, "seed": 3, **train})


def _adapter(outcome) -> dict:
    return load_file(str(Path(outcome.adapter_path) / "adapter_model.safetensors"))


def test_two_ranks_train_what_one_process_trains(tmp_path, one_torch_thread):
    one = run_job(JobContext(job_id="one", batch_id="b", spec=_spec(1, max_steps=5), artifacts_root=tmp_path))
    two = distributed.run_job(JobContext(job_id="two", batch_id="b", spec=_spec(2, max_steps=5),
                                         artifacts_root=tmp_path))
    # the same losses, step by step, and the same trained weights (fp32, summed in another order)
    assert [(step, split) for step, split, _ in two.loss_curve] == [(step, split) for step, split, _ in one.loss_curve]
    for (_, _, expected), (_, _, got) in zip(one.loss_curve, two.loss_curve, strict=True):
        assert got == pytest.approx(expected, rel=1e-5)
    weights_one, weights_two = _adapter(one), _adapter(two)
    assert weights_one.keys() == weights_two.keys()
    changed = 0.0
    for name, weight in weights_one.items():
        assert (weights_two[name] - weight).abs().max() < 1e-3, name
        changed = max(changed, float(weight.abs().max()))
    assert changed > 0
    assert two.metrics["steps"] == 5 and two.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-4)
    # only rank 0 wrote: one job directory, no checkpoint left, nothing of the other rank's
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == ["one", "two"]


def test_every_rank_stops_where_rank_0s_early_stopping_stops(tmp_path, one_torch_thread):
    # eval loss falls on this job, so `max` on it never improves after step 1: rank 0 alone evaluates and
    # decides; the other rank must stop at the same step instead of waiting in the next all-reduce
    spec = _spec(2, max_steps=12, eval_every=1, early_stopping={"metric": "eval_loss", "mode": "max", "patience": 2})
    two = distributed.run_job(JobContext(job_id="two", batch_id="b", spec=spec, artifacts_root=tmp_path))
    assert two.metrics["steps"] == 3 and two.metrics["best_step"] == 1


def _kill_rank_once_checkpointed(checkpoint: Path, rank: int, killed: list[int]) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ranks = [p for p in multiprocessing.active_children() if p.name == f"graftq-rank-{rank}"]
            if ranks and (checkpoint / "trainer_state.json").exists():
                os.kill(ranks[0].pid, signal.SIGKILL)
                killed.append(json.loads((checkpoint / "trainer_state.json").read_text())["step"])
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_rank_requeues_the_job_and_it_resumes_from_rank_0s_checkpoint(sqlite_url, tmp_path):
    from worker.tasks import _Retry, execute_job

    database = get_database(sqlite_url)
    settings = Settings(database_url=sqlite_url, artifacts_dir=tmp_path / "artifacts")
    spec = _spec(2, max_steps=24, checkpoint_every=2)
    with database.begin() as connection:
        batch_id, [job_id] = create_batch(connection, "b", [{
            "task": "t", "kind": "train", "extension": "lora", "base_model": spec.base_model, "queue": "graftq",
            "spec": spec.to_json(), "gpus": 2}], max_attempts=2)
    checkpoint = tmp_path / "artifacts" / batch_id / f".{job_id}.checkpoint"
    killed: list[int] = []
    watcher = _kill_rank_once_checkpointed(checkpoint, 1, killed)
    with pytest.raises(_Retry):
        execute_job(job_id, settings, worker="w")
    watcher.join()
    with database.read() as connection:
        job = get_job(connection, job_id)
    assert killed and job.status == "queued" and job.attempts == 1 and job.gpus == 2
    assert "rank 1 of 2" in job.error and "killed by SIGKILL" in job.error
    assert (checkpoint / "trainer_state.json").exists()  # rank 0's, kept for the next attempt

    assert execute_job(job_id, settings, worker="w") == "succeeded"
    with database.read() as connection:
        job = get_job(connection, job_id)
    assert job.status == "succeeded" and job.attempts == 2 and job.steps == 24
    info = json.loads((Path(job.job_dir) / "job.json").read_text())
    assert info["metrics"]["resumed_from_step"] >= killed[0] >= 2
    assert not checkpoint.exists()
    clear_cache()



def test_a_shutdown_hands_back_with_rank_0s_checkpoint_of_that_step_and_a_cancel_stops_every_rank(tmp_path):
    from worker.errors import JobCancelled, JobInterrupted

    steps: list[int] = []  # the training steps rank 0 reported

    def report(progress) -> None:
        if progress.phase == "train":
            steps.append(progress.step)

    def context(stop) -> JobContext:
        steps.clear()
        return JobContext(job_id="j", batch_id="b", spec=_spec(2, max_steps=200, checkpoint_every=100),
                          artifacts_root=tmp_path, on_progress=report, should_cancel=stop, progress_interval=0)

    def shutting_down() -> bool:
        if steps and steps[-1] >= 2:
            raise JobInterrupted("the worker is shutting down")
        return False

    ctx = context(shutting_down)
    with pytest.raises(JobInterrupted):
        distributed.run_job(ctx)
    saved = json.loads((ctx.resume_dir / "trainer_state.json").read_text())["step"]
    assert 2 <= saved < 100  # written when it stopped, by rank 0

    ctx = context(lambda: bool(steps))
    with pytest.raises(JobCancelled):
        distributed.run_job(ctx)
    assert steps[0] > saved  # the second run resumed from that checkpoint
    assert not (tmp_path / "b" / "j").exists() and multiprocessing.active_children() == []


_SUPERVISOR = """
import logging, sys
from pathlib import Path
from tests.test_distributed import _spec
from worker import distributed
from worker.pipeline import JobContext

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    distributed.run_job(JobContext(job_id="j", batch_id="b", spec=_spec(2, max_steps=100000, checkpoint_every=2),
                                   artifacts_root=Path(sys.argv[1])))
"""


@pytest.mark.slow
def test_the_ranks_end_when_the_worker_process_holding_the_job_is_killed(tmp_path):
    import re
    import subprocess

    from tests.conftest import ROOT

    script = tmp_path / "supervisor.py"
    script.write_text(_SUPERVISOR)
    log = tmp_path / "supervisor.log"
    with log.open("wb") as output:
        supervisor = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=ROOT, stdout=output,
                                      stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "b" / ".j.checkpoint").exists():  # training, on both ranks
            assert supervisor.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        pids = [int(pid) for pid in re.search(r"2 ranks started \(pids (\d+) (\d+)\)", log.read_text()).groups()]
    finally:
        supervisor.kill()
        supervisor.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"ranks {pids} outlived the process holding the job"
        time.sleep(0.2)

# ---- a host's devices shared by its worker processes ---------------------------------------------

def test_a_two_device_job_is_not_started_while_one_device_is_busy_and_pauses_that_devices_worker(tmp_path):
    from worker.distributed import DevicesBusy, HostDevices

    host = HostDevices(tmp_path, ["GPU-a", "GPU-b", "GPU-c"])
    gathered: list[list[str]] = []
    stop_waiting = threading.Event()

    def gather_two() -> None:
        with host.gather(2, give_up=stop_waiting.is_set, poll=0.02) as devices:
            gathered.append(devices)

    with host.one(0), host.one(1):  # two one-device jobs run on a, b
        waiter = threading.Thread(target=gather_two)
        waiter.start()
        time.sleep(0.3)
        assert gathered == []  # only c is free: the job is not claimed
        # c is kept for it: its one-device worker is paused, and hands its delivery back
        with pytest.raises(DevicesBusy, match="device 2 .GPU-c. runs a multi-device job"), host.one(2, wait=0.2):
            pass
        with host.one(0, wait=0.2):  # another process of a busy GPU (--jobs-per-gpu) is not held up
            pass
    waiter.join(timeout=10)
    [devices] = gathered
    assert len(devices) == 2 and "GPU-c" in devices  # kept c, then took a device that freed up
    with host.one(0), host.one(1), host.one(2):  # the job ended: every device is free again
        pass
    # a worker that stops while it waits gives the delivery back
    stop_waiting.set()
    with host.one(0), pytest.raises(DevicesBusy, match="stops"), host.gather(3, give_up=stop_waiting.is_set):
        pass


def test_graftq_worker_plans_a_worker_per_job_size_on_the_host_devices():
    from jobs.submit import job_queue
    from worker.launcher import Gpu, GpuSelection, plan_sized_workers, plan_workers

    settings = Settings()
    gpus = [Gpu(index, "H100", f"GPU-{index}", f"GPU-{index}") for index in range(4)]
    workers = plan_workers(settings, GpuSelection("list", (0, 1, 2, 3)), gpus=gpus)
    workers += plan_sized_workers(workers)
    queues = {worker.name: worker.argv[worker.argv.index("-Q") + 1] for worker in workers}
    assert queues == {**{f"graftq-gpu{i}": "graftq.gpu,graftq" for i in range(4)},
                      **{f"graftq-{n}gpus": f"graftq.gpu.gpus-{n},graftq.gpus-{n}" for n in (2, 3, 4)}}
    sized = workers[4]
    assert sized.env["CUDA_VISIBLE_DEVICES"] == "" and sized.env["GRAFTQ_SLOTS"] == "GPU-0,GPU-1,GPU-2,GPU-3"
    assert job_queue(settings, _spec(2)) == "graftq.cpu.gpus-2" and job_queue(settings, _spec(1)) == "graftq.cpu"

    cpu = plan_workers(settings, GpuSelection("none"), cpu_slots=2)
    cpu += plan_sized_workers(cpu)
    assert [(w.name, w.argv[w.argv.index("-Q") + 1]) for w in cpu] == [
        ("graftq-cpu0", "graftq.cpu,graftq"), ("graftq-cpu1", "graftq.cpu,graftq"),
        ("graftq-2cpus", "graftq.cpu.gpus-2,graftq.gpus-2")]
    [alone] = plan_workers(settings, GpuSelection("none"))
    assert plan_sized_workers([alone]) == [] and "GRAFTQ_SLOTS" not in alone.env


@pytest.mark.slow
def test_a_cpu_host_with_two_slots_runs_a_two_rank_job_and_a_one_slot_job_from_the_queue(tmp_path, redis_server):
    import subprocess
    import textwrap

    from click.testing import CliRunner

    from db.queries import jobs_of_batch
    from jobs.cli import cli
    from tests.conftest import ROOT, graftq_argv

    redis_server.start()
    database_url = f"sqlite:///{tmp_path / 'graftq.db'}"
    options = ["--database-url", database_url, "--broker-url", redis_server.url,
               "--artifacts-dir", str(tmp_path / "artifacts")]
    batch = tmp_path / "wide.yaml"
    batch.write_text(textwrap.dedent(f"""\
        batch: wide
        base_model: random:t5-tiny
        defaults:
          device: cpu
          train: {{dataset: {EXAMPLES / 'reverse.jsonl'}, max_steps: 4, batch_size: 8, eval_fraction: 0.05}}
        jobs:
          - {{task: wide, extension: lora, resources: {{gpus: 2}}}}
          - {{task: narrow, extension: lora}}
        """))
    submitted = CliRunner().invoke(cli, [*options, "submit", str(batch)], catch_exceptions=False)
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip().splitlines()[-1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRAFTQ_DATABASE_URL": database_url,
           "GRAFTQ_BROKER_URL": redis_server.url, "GRAFTQ_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(graftq_argv("worker", "--gpus", "none", "--cpu-slots", "2", "--reap-interval", "0"),
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            with get_database(database_url).read() as connection:
                jobs = {job.task: job for job in jobs_of_batch(connection, batch_id)}
            if all(job.status in ("succeeded", "failed") for job in jobs.values()):
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(1)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
    output = (tmp_path / "worker.log").read_text(errors="replace")
    assert {task: job.status for task, job in jobs.items()} == {"wide": "succeeded", "narrow": "succeeded"}, output
    assert jobs["wide"].gpus == 2 and jobs["wide"].worker.startswith("graftq-2cpus@")
    assert jobs["narrow"].gpus == 1 and jobs["narrow"].worker.startswith(("graftq-cpu0@", "graftq-cpu1@"))
    assert "2 ranks started" in output
    clear_cache()
