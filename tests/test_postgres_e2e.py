"""The pool's results database: an end-to-end batch with PostgreSQL instead of SQLite.

Runs against GRAFTQ_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test)
in a database of its own, created and dropped here; skipped, with the reason, without a server.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ROOT, WorkerProcess, graftq_argv

BATCH = """\
batch: pg-e2e
base_model: random:t5-tiny
defaults:
  lora: {r: 4}
  train: {dataset: DATASET, max_steps: 3, batch_size: 4, checkpoint_every: 0}
jobs:
  - {task: reverse, extension: lora}
  - {task: reverse, extension: layer, kind: create}
  - {task: reverse, extension: hybrid}
"""


def _graftq(env, *args, timeout=300):
    result = subprocess.run(graftq_argv(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"graftq {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.postgres
@pytest.mark.slow
def test_batch_end_to_end_with_postgresql(postgres_database, redis_url, graftq_env, dataset, tmp_path):
    env = dict(graftq_env, GRAFTQ_DATABASE_URL=postgres_database, GRAFTQ_BROKER_URL=redis_url)
    batch_file = tmp_path / "batch.yaml"
    batch_file.write_text(BATCH.replace("DATASET", str(dataset)))

    submit = subprocess.run(graftq_argv("submit", str(batch_file)), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert submit.returncode != 0 and "graftq db upgrade" in submit.stderr  # never migrated behind one's back
    _graftq(env, "db", "upgrade")
    batch_id = re.search(r"\b([0-9a-f]{16})\b", _graftq(env, "submit", str(batch_file))).group(1)

    def finished() -> bool:
        nonlocal jobs
        jobs = json.loads(_graftq(env, "results", "--batch", batch_id, "--format", "json"))
        return all(job["status"] in ("succeeded", "failed", "cancelled") for job in jobs)

    jobs: list[dict] = []
    with WorkerProcess(env, "--gpus", "none") as worker:
        worker.wait_for(finished, timeout=180, what="the batch to finish")

    assert sorted((job["extension"], job["status"], job["attempts"]) for job in jobs) == [
        ("hybrid", "succeeded", 1), ("layer", "succeeded", 1), ("lora", "succeeded", 1)]
    for job in jobs:
        assert job["total_params"] == job["base_params"] + job["lora_params"] + job["layer_params"]
        assert Path(job["adapter_path"] or job["layer_path"]).is_dir()
    trained = [job for job in jobs if job["extension"] != "layer"]
    assert all(job["steps"] == 3 and job["eval_loss"] is not None for job in trained)
    # The loss curve is in PostgreSQL too.
    engine = create_engine(postgres_database)
    with engine.connect() as connection:
        points = connection.execute(text("SELECT count(*) FROM metric_points")).scalar_one()
    engine.dispose()
    assert points == 2 * (3 + 2)  # per trained job: 3 train points, eval before and after
