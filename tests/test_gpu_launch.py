"""The GPU path without a GPU: which GPU each worker process is pinned to (a fake `nvidia-smi`),
the GPU worker's start-up self-check and the probe (`torch.cuda` capability queries patched),
`device: cuda:N` at submit, and the GPU benchmark's kernel-time aggregation and peak table."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from db.session import clear_cache
from jobs.cli import cli
from jobs.settings import Settings
from tests.conftest import ROOT
from worker import device as device_module
from worker.errors import DeviceError
from worker.launcher import (
    SELF_CHECK_FAILED,
    GpuSelection,
    LauncherError,
    child_started,
    detect_gpus,
    plan_workers,
    serve,
)

L4, L40, A100 = "GPU-4a1c0000-0000", "GPU-40aa0000-0000", "GPU-a100cccc-0000"
MIG0, MIG1 = "MIG-d0d0d0d0-0000", "MIG-e1e1e1e1-0000"
# `nvidia-smi -L` on a mixed host: PCI bus order, an A100 split into two MIG instances.
MIXED_HOST = f"""\
GPU 0: NVIDIA L4 (UUID: {L4})
GPU 1: NVIDIA L40 (UUID: {L40})
GPU 2: NVIDIA A100-SXM4-80GB (UUID: {A100})
  MIG 3g.40gb     Device  0: (UUID: {MIG0})
  MIG 3g.40gb     Device  1: (UUID: {MIG1})
"""
STICKY = "CUDA error: an illegal memory access was encountered"


@pytest.fixture
def mixed_host(tmp_path, monkeypatch):
    """A fake `nvidia-smi` on PATH listing MIXED_HOST; no inherited CUDA_VISIBLE_DEVICES."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{MIXED_HOST}EOF\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tool


def _pinning(workers) -> list[tuple[str, str, str | None]]:
    return [(w.name, w.env["CUDA_VISIBLE_DEVICES"], w.env.get("CUDA_DEVICE_ORDER")) for w in workers]


def test_each_worker_is_pinned_by_uuid_to_the_gpu_nvidia_smi_numbers(mixed_host):
    assert [gpu.label for gpu in detect_gpus()] == ["gpu0", "gpu1", "gpu2-mig0", "gpu2-mig1"]
    workers = plan_workers(Settings(), GpuSelection("all"))
    # one worker per MIG instance (CUDA cannot use a MIG-enabled A100 whole); the order setting
    # makes any index a job's code uses mean nvidia-smi's numbering too
    assert _pinning(workers) == [("graftq-gpu0", L4, "PCI_BUS_ID"), ("graftq-gpu1", L40, "PCI_BUS_ID"),
                                 ("graftq-gpu2-mig0", MIG0, "PCI_BUS_ID"), ("graftq-gpu2-mig1", MIG1, "PCI_BUS_ID")]
    assert all(w.env["GRAFTQ_LAUNCHER_PID"] == str(os.getpid()) for w in workers)
    assert workers[1].env["GRAFTQ_WORKER_GPU"] == f"1 (NVIDIA L40, {L40})"
    # --gpus takes nvidia-smi's indices: 1 is the L40 however CUDA would rank it
    assert _pinning(plan_workers(Settings(), GpuSelection("list", (1, 2)))) == [
        ("graftq-gpu1", L40, "PCI_BUS_ID"), ("graftq-gpu2-mig0", MIG0, "PCI_BUS_ID"),
        ("graftq-gpu2-mig1", MIG1, "PCI_BUS_ID")]
    [cpu] = plan_workers(Settings(), GpuSelection("none"))
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == "" and "GRAFTQ_WORKER_GPU" not in cpu.env


def test_an_inherited_cuda_visible_devices_limits_the_gpus(mixed_host, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"1,{MIG1[:10]}")  # an index and a UUID prefix
    assert _pinning(plan_workers(Settings(), GpuSelection("all"))) == [
        ("graftq-gpu1", L40, "PCI_BUS_ID"), ("graftq-gpu2-mig1", MIG1, "PCI_BUS_ID")]
    with pytest.raises(LauncherError, match=r"GPU 0 not found: nvidia-smi lists 1, 2 \(CUDA_VISIBLE_DEVICES="):
        plan_workers(Settings(), GpuSelection("list", (0,)))

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", A100)  # a MIG-enabled GPU's UUID: its instances
    assert [w.name for w in plan_workers(Settings(), GpuSelection("all"))] == ["graftq-gpu2-mig0", "graftq-gpu2-mig1"]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ffff")  # CUDA would silently drop it: refused
    with pytest.raises(LauncherError, match=r"'GPU-ffff' is not a GPU nvidia-smi lists .*unset it"):
        plan_workers(Settings(), GpuSelection("all"))

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # no nvidia-smi: one CPU worker, as without the variable
    [cpu] = plan_workers(Settings(), GpuSelection("all"), gpus=[])
    assert cpu.name == "graftq-cpu"

    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        [cpu] = plan_workers(Settings(), GpuSelection("all"))
        assert cpu.name == "graftq-cpu" and f"CUDA_VISIBLE_DEVICES={hidden!r} limits them" in caplog.text


@pytest.fixture
def gpu_worker_env(monkeypatch):
    """The environment `graftq worker` gives a GPU worker process (the launcher check left out)."""
    monkeypatch.setenv("GRAFTQ_WORKER_GPU", f"1 (NVIDIA L40, {L40})")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", L40)
    monkeypatch.delenv("GRAFTQ_LAUNCHER_PID", raising=False)


def _cuda(monkeypatch, *, available: bool = True, count: int = 1, probe_error: str | None = None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cpu_ones = torch.ones

    def ones(*size, device=None, **kwargs):  # the probe's allocation on the "GPU"
        if probe_error is not None:
            raise RuntimeError(probe_error)
        return cpu_ones(*size, **kwargs)

    monkeypatch.setattr(torch, "ones", ones)


@pytest.mark.parametrize("cuda, message", [
    ({"available": False}, f"CUDA is not available (CUDA_VISIBLE_DEVICES={L40}; torch "),
    ({"count": 2}, f"this process sees 2 CUDA devices (CUDA_VISIBLE_DEVICES={L40}); a GPU worker owns exactly one"),
    ({"probe_error": STICKY}, f"a test computation on the GPU failed ({STICKY})"),
])
def test_a_gpu_worker_that_cannot_run_cuda_exits_at_start_with_the_reason(gpu_worker_env, monkeypatch, capsys,
                                                                          cuda, message):
    _cuda(monkeypatch, **cuda)
    with pytest.raises(SystemExit) as exited:
        child_started()
    assert exited.value.code == SELF_CHECK_FAILED
    assert f"GPU 1 (NVIDIA L40, {L40}) failed the start-up self-check: {message}" in capsys.readouterr().err


def test_a_healthy_gpu_worker_and_a_cpu_worker_start(gpu_worker_env, monkeypatch):
    _cuda(monkeypatch)
    child_started()  # returns: the worker goes on to consume
    monkeypatch.delenv("GRAFTQ_WORKER_GPU")
    _cuda(monkeypatch, available=False)
    child_started()  # a CPU worker does not check for CUDA


def test_the_probe_raises_a_sticky_cuda_error_as_it_is_and_names_the_fix_for_cuda_n(monkeypatch):
    _cuda(monkeypatch, probe_error=STICKY)
    with pytest.raises(RuntimeError, match="illegal memory access") as raised:
        device_module.get_device("cuda")
    assert not isinstance(raised.value, DeviceError)  # the task replaces the process on it
    _cuda(monkeypatch, probe_error="CUDA error: out of memory")
    with pytest.raises(DeviceError, match="device: cuda:0 does not work"):
        device_module.get_device("cuda")
    _cuda(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", L40)
    with pytest.raises(DeviceError, match=r"'cuda:1' does not exist; this worker sees 1 .*use device: cuda"):
        device_module.get_device("cuda:1")


def test_a_sticky_cuda_error_in_the_probe_replaces_the_worker_process(tmp_path, monkeypatch):
    from db.queries import get_job
    from db.session import get_database
    from db.submission import create_batch
    from worker import tasks

    database_url = f"sqlite:///{tmp_path / 'g.db'}"
    spec = {"task": "t", "kind": "create", "extension": "lora", "base_model": "random:t5-tiny", "device": "cuda"}
    database = get_database(database_url)
    with database.begin() as session:
        _, [job_id] = create_batch(session, "sticky", [{**spec, "queue": "graftq.gpu", "spec": spec}])
    _cuda(monkeypatch, probe_error=STICKY)
    signals = []
    monkeypatch.setattr(tasks.os, "kill", lambda pid, signum: signals.append((pid, signum)))
    status = tasks.execute_job(job_id, Settings(database_url=database_url, artifacts_dir=tmp_path), worker="w")
    assert status == "failed" and signals == [(os.getpid(), signal.SIGTERM)]  # warm shutdown, then a restart
    with database.read() as session:
        assert "illegal memory access" in get_job(session, job_id).error
    clear_cache()


CHILD = "from worker.launcher import child_started; child_started(); print('serving', flush=True)"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # dead, not yet reaped
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_process_dies_with_its_launcher():
    env = {key: value for key, value in os.environ.items() if key != "GRAFTQ_WORKER_GPU"}
    env["PYTHONPATH"] = str(ROOT)
    # a stand-in launcher starts a worker process as `graftq worker` does, and is SIGKILLed
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = {{**os.environ, "GRAFTQ_LAUNCHER_PID": str(os.getpid())}}
        child = subprocess.Popen([sys.executable, "-c", {CHILD + "; import time; time.sleep(120)"!r}], env=env,
                                 start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(120)
    """)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == "serving"
        launcher.kill()
        deadline = time.monotonic() + 30
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child)
    finally:
        launcher.kill()
        launcher.wait()

    # started while its launcher was already gone: it exits at once
    orphan = subprocess.run([sys.executable, "-c", CHILD], env={**env, "GRAFTQ_LAUNCHER_PID": "1"},
                            capture_output=True, text=True, timeout=60)
    assert orphan.returncode != 0 and "the launcher (pid 1) is gone" in orphan.stderr and not orphan.stdout


@pytest.mark.slow
def test_the_launcher_does_not_restart_a_gpu_worker_that_failed_its_self_check(mixed_host, tmp_path, capfd,
                                                                                caplog):
    # The fake UUID pins no real GPU (and this torch may have no CUDA): the real worker process
    # for GPU 1 finds no CUDA device and fails its self-check.
    caplog.set_level(logging.INFO, logger="graftq.worker")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'g.db'}", broker_url="redis://127.0.0.1:1/0")
    started = time.monotonic()
    assert serve(settings, GpuSelection("list", (1,)), reap_interval=0) == 1
    assert time.monotonic() - started < 60  # no restarts with back-off
    assert caplog.text.count("started graftq-gpu1") == 1
    assert "graftq-gpu1 failed its GPU self-check" in caplog.text and "not restarting it" in caplog.text
    assert "failed the start-up self-check: CUDA is not available" in capfd.readouterr().err


def _batch(tmp_path, *devices: str):
    jobs = "".join(f"  - {{task: t{i}, kind: create, extension: lora, device: '{d}'}}\n" for i, d in enumerate(devices))
    path = tmp_path / "gpus.yaml"
    path.write_text(f"base_model: random:t5-tiny\njobs:\n{jobs}")
    return str(path)


def test_submit_refuses_cuda_n_before_writing_anything(tmp_path, redis_url, redis_server):
    database = tmp_path / "g.db"
    options = ["--database-url", f"sqlite:///{database}", "--broker-url", redis_url, "submit"]
    for dry_run in ([], ["--dry-run"]):
        result = CliRunner().invoke(cli, [*options, *dry_run, _batch(tmp_path, "cuda", "cuda:1")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert ("job 1 (task 't1'): key `device`: 'cuda:1' names one GPU of a machine, but a pool worker owns "
                "exactly one GPU: use device: cuda") in result.output
    assert not database.exists() and sum(redis_server.queue_lengths().values()) == 0

    result = CliRunner().invoke(cli, [*options, _batch(tmp_path, "cuda", "cuda:0")])
    assert result.exit_code == 0, result.output
    assert redis_server.queue_lengths()["graftq.gpu"] == 2
    clear_cache()


def test_graftq_run_keeps_cuda_n(tmp_path):
    from jobs.batch import load_batch
    from jobs.errors import SpecError
    from jobs.submit import check_pool_devices

    (tmp_path / "b.yaml").write_text(textwrap.dedent("""
        base_model: random:t5-tiny
        jobs: [{task: t, kind: create, extension: lora, device: 'cuda:3'}]
    """))
    batch = load_batch(tmp_path / "b.yaml")  # valid: `graftq run` sees every GPU of its machine
    assert batch.jobs[0].device == "cuda:3"
    with pytest.raises(SpecError, match="key `device`"):
        check_pool_devices(batch)


# --- the GPU benchmark ----------------------------------------------------------------------------


@pytest.fixture
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu_training

        yield bench_gpu_training
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _event(key: str, device_type, self_device_us: float, annotation: bool = False):
    return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_device_us,
                           is_user_annotation=annotation)


def test_gpu_busy_fraction_counts_each_kernel_once(bench):
    from torch.autograd import DeviceType

    events = [
        # CPU ops carry the device time of the kernels they launched
        _event("aten::mm", DeviceType.CPU, 600.0), _event("aten::addmm", DeviceType.CPU, 200.0),
        _event("ProfilerStep#1", DeviceType.CUDA, 1000.0, annotation=True),  # spans the kernels
        _event("sm90_xmma_gemm_bf16bf16_bf16f32", DeviceType.CUDA, 600.0),
        _event("ampere_bf16_s16816gemm", DeviceType.CUDA, 200.0),
        _event("vectorized_elementwise_kernel", DeviceType.CUDA, 200.0),
        _event("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA, 0.0),
    ]
    shares = bench.kernel_time_shares(events, wall=0.002)
    assert shares["gpu_busy_fraction (kernel time / wall)"] == pytest.approx(0.5)
    assert shares["matmul_share_of_kernel_time"] == pytest.approx(0.8)
    top = shares["top_kernels (name, share of kernel time)"]
    assert [name for name, _ in top] == ["sm90_xmma_gemm_bf16bf16_bf16f32", "ampere_bf16_s16816gemm",
                                         "vectorized_elementwise_kernel"]
    assert not any(name.startswith("aten::") for name, _ in top)


def test_gpu_peak_table_matches_whole_model_names(bench, monkeypatch):
    monkeypatch.delenv("GRAFTQ_GPU_PEAK_TFLOPS", raising=False)
    assert bench.peak_tflops("NVIDIA L40") == 181.0
    assert bench.peak_tflops("NVIDIA L40S") == 362.1
    assert bench.peak_tflops("NVIDIA L4") == 121.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090") is None
    monkeypatch.setenv("GRAFTQ_GPU_PEAK_TFLOPS", "100")
    assert bench.peak_tflops("NVIDIA L4") == 100.0


# --- scripts/gpu-check.sh ---------------------------------------------------------------------------

GPU_CHECK = ROOT / "scripts" / "gpu-check.sh"


def test_gpu_check_script_parses_and_runs_what_exists():
    import re
    import tomllib

    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0
    script = GPU_CHECK.read_text()
    markers = [line.split(":")[0] for line in tomllib.loads((ROOT / "pyproject.toml").read_text())
               ["tool"]["pytest"]["ini_options"]["markers"]]
    assert set(re.findall(r"pytest -m (\w+)", script)) == {"gpu"} and "gpu" in markers
    paths = set(re.findall(r"\b(?:tests|benchmarks)/[\w/]+\.py\b", script))
    assert {"tests/test_gpu_launch.py", "benchmarks/bench_gpu_training.py"} <= paths
    assert all((ROOT / path).exists() for path in paths), paths


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_check_script_fails_clearly_without_a_usable_gpu(mixed_host, tmp_path):
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent), "GPU_CHECK_OUT": str(tmp_path / "out")}
    result = subprocess.run([str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=300)
    # nvidia-smi (the fake) lists GPUs, but this torch cannot use one: it stops there, non-zero
    assert result.returncode == 1
    assert "PASS  nvidia_smi" in result.stdout and "FAIL  venv_with_cuda" in result.stdout
    assert "sees no CUDA device" in result.stdout and "FAIL: see the logs" in result.stdout
    assert "gpu_tests" not in result.stdout

    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(mixed_host.parent))
    if shutil.which("nvidia-smi", path=env["PATH"]) is None:
        result = subprocess.run([str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "FAIL  nvidia_smi" in result.stdout
