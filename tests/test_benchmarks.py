"""The benchmark harness runs as benchmarks/README.md shows it (a smoke run; its ratios are not read).

The figures are measured by `make bench`, never asserted here; this checks that the commands
the benchmarks' README gives still work end to end: `run_all.py --quick --only ... --json`,
the dispatch benchmark's worker and reference processes included, and the GPU
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
        [sys.executable, "benchmarks/run_all.py", "--quick", "--only", "submission", "--only", "cli_start",
         "--json", str(summary_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    # exit 1 only means a quick run missed a target (their sizes are too small to meet them)
    assert completed.returncode in (0, 1), completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    results = {result["name"]: result for result in summary["results"]}
    assert set(results) == {"submission", "cli_start"}
    assert all(result["error"] is None for result in results.values()), completed.stdout[-3000:]

    [submission] = results["submission"]["checks"]
    assert submission["ratio"] > 0 and results["submission"]["figures"]["jobs"] == 2000
    start = results["cli_start"]
    assert len(start["figures"]["--help_s"]) == len(start["figures"]["reference_s"]) == 3
    # the commands that only read the database import none of the training stack
    assert [check["value"] for check in start["checks"] if "imports none" in check["what"]] == [0] * 6
    for name in ("submission", "cli_start"):
        assert f"{name:<15}" in completed.stdout and "ratio" in completed.stdout
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


@pytest.mark.slow
def test_scripts_vs_queue_smoke_run_trains_the_same_experiments_both_ways(tmp_path):
    # `python benchmarks/bench_scripts_vs_queue.py --quick`: one script before and one after a
    # `graftq run` of the same two experiments; both sides train, evaluate and save.
    result_path = tmp_path / "scripts.json"
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_scripts_vs_queue.py", "--quick", "--json", str(result_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    result = json.loads(result_path.read_text())
    assert result["error"] is None, completed.stdout[-3000:] + completed.stderr[-3000:]
    figures = result["figures"]
    [check] = result["checks"]
    assert figures["jobs"] == 2 and check["ratio"] == pytest.approx(figures["graftq_run_s"] / figures["scripts_total_s"])
    assert 0 < figures["script_share_of_time_in_imports"] < 1
    # the same experiments: held-out losses after 30 steps agree between the script and graftq
    script_loss, graftq_loss = figures["eval_loss_median (scripts, graftq)"]
    assert graftq_loss == pytest.approx(script_loss, rel=0.1)
    assert "graftq" in check["what"] and "x faster" in check["what"]
