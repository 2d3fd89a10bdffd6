"""OOM back-off: an out-of-memory error in training re-runs the job, in the same attempt, from its last
checkpoint with half the micro-batch and twice the accumulation, down to micro-batch 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from db.queries import get_job, loss_curve
from db.session import clear_cache, get_database
from db.submission import create_batch
from jobs.settings import Settings
from jobs.spec import JobSpec
from worker.backoff import smaller_micro_batch
from worker.tasks import execute_job
from worker.training import Trainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
TRAIN = {"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 4, "batch_size": 4, "checkpoint_every": 2,
         "eval_fraction": 0.05, "eval_batch_size": 16, "max_length": 24}


def _oom_above(monkeypatch, micro_batch: int, from_step: int = 0) -> list[int]:
    """Make every training forward pass of more than `micro_batch` examples, from optimizer step
    `from_step` (0-based) on, raise CUDA's out-of-memory error, as a GPU too small would. Returns
    the micro-batch sizes that ran out."""
    refused: list[int] = []
    setup = Trainer.setup

    def setup_then_inject(trainer):
        setup(trainer)

        def forward(module, args, kwargs):
            size = kwargs["input_ids"].shape[0]
            if module.training and size > micro_batch and trainer.step >= from_step:
                refused.append(size)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        trainer.model.register_forward_pre_hook(forward, with_kwargs=True)

    monkeypatch.setattr(Trainer, "setup", setup_then_inject)
    return refused


def _run(sqlite_url, artifacts_dir, train=TRAIN):
    spec = JobSpec(task="t", extension="lora", base_model="random:t5-tiny", device="cpu", lora={"dropout": 0},
                   train=train)
    database = get_database(sqlite_url)
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "oom", [{
            "task": "t", "kind": "train", "extension": "lora", "base_model": spec.base_model, "queue": "graftq",
            "spec": spec.to_json()}], max_attempts=3)
    status = execute_job(job_id, Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir), worker="w")
    with database.read() as connection:
        return status, get_job(connection, job_id), loss_curve(connection, job_id)


def test_the_smaller_micro_batch_divides_the_last_one():
    assert [smaller_micro_batch(size) for size in (8, 4, 2, 1, 6, 3, 5)] == [4, 2, 1, None, 3, 1, 1]


@pytest.mark.slow
def test_an_oom_backs_off_resumes_and_trains_on_the_same_examples(sqlite_url, artifacts_dir, tmp_path, monkeypatch):
    status, straight, straight_curve = _run(sqlite_url, tmp_path / "straight")
    assert status == "succeeded" and straight.micro_batch_size == 4

    # step 3 runs out of memory after the checkpoint of step 2: it resumes there with micro-batch 2
    refused = _oom_above(monkeypatch, 2, from_step=2)
    status, job, curve = _run(sqlite_url, artifacts_dir)
    assert status == "succeeded", job.error
    assert refused == [4]
    assert (job.attempts, job.micro_batch_size, job.steps) == (1, 2, 4)  # no attempt spent
    info = json.loads((Path(job.job_dir) / "job.json").read_text())
    assert (info["spec"]["train"]["batch_size"], info["spec"]["train"]["grad_accum_steps"]) == (2, 2)
    assert info["metrics"]["effective_batch_size"] == 4 and info["metrics"]["resumed_from_step"] == 2
    # the same examples per step, the gradient of the same token-weighted mean: the same training
    assert [step for step, split, _ in curve] == [step for step, split, _ in straight_curve]
    assert [value for *_, value in curve] == pytest.approx([value for *_, value in straight_curve], rel=1e-4)
    assert job.eval_loss == pytest.approx(straight.eval_loss, rel=1e-4)
    clear_cache()


def test_out_of_memory_at_micro_batch_1_fails_the_job_with_what_was_tried(sqlite_url, artifacts_dir, monkeypatch):
    refused = _oom_above(monkeypatch, 0)
    status, job, _ = _run(sqlite_url, artifacts_dir)
    assert status == "failed" and refused == [4, 2, 1]
    assert job.attempts == 1 and job.micro_batch_size is None
    assert "out of memory on cpu at step 1 with train.batch_size=1, the smallest micro-batch; set " \
           "train.gradient_checkpointing: true" in job.error
    assert "The OOM back-off had already taken train.batch_size from 4 to 1 (train.grad_accum_steps from 1 to 4, " \
           "the same 4 examples per step)" in job.error
    clear_cache()
