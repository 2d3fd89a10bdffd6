"""A job that runs out of memory or diverges fails with advice, frees its memory and records nothing false."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch

from db.claims import claim_job, finish_job
from db.queries import get_job, loss_curve
from db.session import clear_cache, get_database
from db.submission import create_batch
from jobs.spec import JobSpec
from worker.errors import OutOfMemory
from worker.pipeline import JobContext, run_job
from worker.training import Trainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
TRAIN = {"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 2, "batch_size": 4, "eval_fraction": 0.05,
         "eval_batch_size": 32}


def _out_of_memory(*args):
    raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def _fault_after_setup(monkeypatch, fault) -> dict[str, weakref.ref]:
    """Run `fault(trainer, refs)` once each job's trainer is set up; refs collects weakrefs."""
    refs: dict[str, weakref.ref] = {}
    setup = Trainer.setup

    def setup_then_fault(self):
        setup(self)
        refs.update(model=weakref.ref(self.model), optimizer=weakref.ref(self.optimizer))
        fault(self, refs)

    monkeypatch.setattr(Trainer, "setup", setup_then_fault)
    return refs


def _oom_in(where: str):
    def fault(trainer, refs):
        def on_forward(module, args, output):
            if not module.training:
                if where == "eval":
                    _out_of_memory()
                return
            refs["graph"] = weakref.ref(output.loss)
            if where == "forward":
                _out_of_memory()
            if where == "backward":
                output.loss.register_hook(_out_of_memory)

        trainer.model.register_forward_hook(on_forward)
        if where == "optimizer step":
            trainer.optimizer.register_step_pre_hook(_out_of_memory)
    return fault


@pytest.mark.parametrize("where,advice", [
    ("forward", "at step 1 with train.batch_size=4; lower train.batch_size"),
    ("backward", "at step 1 with train.batch_size=4; lower train.batch_size"),
    ("optimizer step", "at step 1 with train.batch_size=4; lower train.batch_size"),
    ("eval", "evaluating after step 0 with train.eval_batch_size=32; lower train.eval_batch_size"),
])
def test_out_of_memory_fails_with_the_right_key_and_frees_the_job(where, advice, tmp_path, monkeypatch):
    refs = _fault_after_setup(monkeypatch, _oom_in(where))
    spec = JobSpec(task="t", extension="lora", base_model="random:gpt2-tiny", device="cpu", train=TRAIN)
    with pytest.raises(OutOfMemory, match=f"out of memory on cpu {advice}") as failure:
        run_job(JobContext(job_id="j", batch_id="b", spec=spec, artifacts_root=tmp_path))
    # The failure is kept (as a worker logs it), yet the job's model, optimizer and graph are gone:
    # the same worker runs its next job with all of its memory.
    assert failure.value.__traceback__ is not None
    assert {name: ref() for name, ref in refs.items()} == dict.fromkeys(refs)


def _nan_loss_at_step_2(trainer, refs):
    steps = []

    def on_forward(module, args, output):
        if module.training:
            steps.append(1)
            if len(steps) == 2:
                output.loss = output.loss * float("nan")
        return output

    trainer.model.register_forward_hook(on_forward)


def test_a_nan_loss_fails_the_job_naming_dtype_and_step_and_records_no_metric(sqlite_url, artifacts_dir,
                                                                               monkeypatch):
    from jobs.settings import Settings
    from worker.tasks import execute_job

    _fault_after_setup(monkeypatch, _nan_loss_at_step_2)
    spec = JobSpec(task="t", extension="lora", base_model="random:gpt2-tiny", device="cpu", train=TRAIN)
    database = get_database(sqlite_url)
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "nan", [{
            "task": "t", "kind": "train", "extension": "lora", "base_model": spec.base_model, "queue": "graftq",
            "spec": spec.to_json()}], max_attempts=3)
    assert execute_job(job_id, Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir), worker="w") == "failed"
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert "training loss is nan at step 2 with dtype float32 on cpu; set dtype:" in job.error
        assert (job.status, job.attempts, job.train_loss, loss_curve(connection, job_id)) == ("failed", 1, None, [])
    clear_cache()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("metrics,curve,named", [
    ({"train_loss": float("nan")}, [], "metrics key 'train_loss' is nan"),
    ({"train_loss": 1.0}, [(1, "train", 1.0), (2, "train", float("inf"))], "the loss curve's point at step 2 is inf"),
])
def test_finish_job_refuses_non_finite_values_with_a_clear_error(backend, metrics, curve, named, request):
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_database")
    if backend == "postgres":
        from db.session import create_database_engine, upgrade_to_head

        engine = create_database_engine(url)
        upgrade_to_head(url, engine)
        engine.dispose()
    database = get_database(url)
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "b", [{"task": "t", "kind": "train", "extension": "lora",
                                                   "base_model": "random:t5-tiny", "queue": "graftq",
                                                   "spec": {"task": "t"}}], max_attempts=1)
    with database.begin() as connection:
        token = claim_job(connection, job_id, "w", stale_after=60).token
    with pytest.raises(ValueError, match=f"job {job_id}: {named}"), database.begin() as connection:
        finish_job(connection, job_id, token, stats={}, metrics=metrics, device="cpu", dtype="float16", versions={},
                   job_dir="/x", loss_curve=curve)
    with database.read() as connection:
        assert (get_job(connection, job_id).status, loss_curve(connection, job_id)) == ("running", [])
    clear_cache()


def test_an_outcome_the_database_refuses_fails_the_job_instead_of_leaving_it_running(sqlite_url, artifacts_dir,
                                                                                      monkeypatch):
    """A non-finite value that got past the trainer: the job ends failed, with the field named, not `running`."""
    from jobs.settings import Settings
    from worker import pipeline
    from worker.tasks import execute_job

    def diverged(ctx):
        return pipeline.JobOutcome(stats={}, metrics={"train_loss": float("inf")}, device="cpu", dtype="float32",
                                   versions={}, job_dir=str(ctx.job_dir))

    monkeypatch.setattr(pipeline, "run_job", diverged)
    spec = JobSpec(task="t", kind="create", extension="lora", base_model="random:t5-tiny", device="cpu")
    database = get_database(sqlite_url)
    with database.begin() as connection:
        _, [job_id] = create_batch(connection, "refused", [{
            "task": "t", "kind": "create", "extension": "lora", "base_model": spec.base_model, "queue": "graftq",
            "spec": spec.to_json()}])
    assert execute_job(job_id, Settings(database_url=sqlite_url, artifacts_dir=artifacts_dir), worker="w") == "failed"
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert job.status == "failed" and job.train_loss is None
        assert "outcome cannot be recorded" in job.error and "train_loss" in job.error
    clear_cache()
