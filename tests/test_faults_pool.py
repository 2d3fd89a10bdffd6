"""The fault suite's pool under load: benchmarks/bench_pool_load.py at a small size (its own file, so
that the two test processes share the fault suite's time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.faults_report import figure

pytestmark = pytest.mark.faults


@pytest.mark.slow
@pytest.mark.postgres
def test_a_pool_under_load_with_one_worker_killed_and_one_restarted_loses_and_repeats_nothing(tmp_path, postgres_url):
    # benchmarks/bench_pool_load.py at a small size: its own Redis, a new PostgreSQL database,
    # 2 `graftq worker` processes, 30 create jobs; a busy worker SIGKILLed whole at a third,
    # another restarted at two thirds.
    out = tmp_path / "pool.json"
    env = {**os.environ, "GRAFTQ_TEST_POSTGRES_URL": postgres_url, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "benchmarks/bench_pool_load.py", "--workers", "2", "--jobs", "30",
                                "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(out.read_text())
    found = result["figures"]
    figure("pool_under_load", workers=found["workers"], jobs=found["jobs"], jobs_per_second=found["jobs_per_second"],
           claim_conflicts=found["claim_conflicts"], requeued=found["requeued_by_reaper"], lost=found["lost"],
           run_twice=found["run_twice"], stuck_running=found["stuck_running"],
           requeued_after_kill_seconds=found["requeued_after_kill_s"] or 0.0)
    assert result["error"] is None, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert found["lost"] == found["run_twice"] == found["stuck_running"] == 0, found["statuses"]
    assert found["statuses"] == {"succeeded": 30} and completed.returncode == 0
    # The job the killed worker held (none if the signal landed between two jobs) ran again, once.
    assert all(job == ["succeeded", 2] for job in found["requeued_jobs (status, attempts)"])
