"""The benchmark harness runs as benchmarks/README.md shows it (a smoke run; its ratios are not read).

The figures are measured by `make bench`, never asserted here; this checks that the commands
the benchmarks' README gives still work end to end: `run_all.py --quick --only ... --json`,
the dispatch benchmark's worker shim and lockstep reference process included, and the GPU
benchmark's CPU smoke run (`bench_gpu_training.py --device cpu`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_run_all_quick_runs_the_chosen_benchmarks_and_writes_their_figures(tmp_path):
    summary_path = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", "--only", "cli_start", "--only", "dispatch",
         "--json", str(summary_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    # exit 1 only means a quick run missed a target (their sizes are too small to meet them)
    assert completed.returncode in (0, 1), completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    results = {result["name"]: result for result in summary["results"]}
    assert set(results) == {"cli_start", "dispatch"}
    assert all(result["error"] is None for result in results.values()), completed.stdout[-3000:]

    dispatch = results["dispatch"]["figures"]
    # the lockstep reference ran every job of the round, and its turns left the queue's clock:
    # counted against the queue they would double it (a quick round measures 1.3-1.5 here)
    assert dispatch["jobs"] == 40 and len(dispatch["lockstep_per_round_ratio"]) == 1
    assert dispatch["lockstep_reference_total_s"][0] > 0
    assert 1.0 < dispatch["lockstep_per_round_ratio"][0] < 2.0
    assert dispatch["overhead_ms_per_job_p50"] > 0
    assert "summary written to" in completed.stdout


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_on_the_cpu_counts_flops_and_profiles_steps(tmp_path):
    # `python benchmarks/bench_gpu_training.py --device cpu` (benchmarks/README.md): the FLOP count,
    # the profiler trace and the dtype check of the GPU benchmark, on the CPU, so that they run in CI.
    result_path = tmp_path / "gpu.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu_training.py", "--device", "cpu", "--quick", "--json", str(result_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(result_path.read_text())
    figures = result["figures"]
    assert result["passed"] and figures["dtype (frozen base weights)"] == "float32"
    # random:t5-tiny, batch 8 of at most 32 tokens: about 0.07 GFLOP a step
    assert 0.01 < figures["gflops_per_step (fwd+bwd)"] < 1 and figures["achieved_tflops"] > 0
    assert figures["profiled_steps"] == 3 and figures["top_cpu_ops (name, share of wall)"]
    assert figures["tokens_per_second"] > 0
