"""`train.report_to`: TensorBoard event files and MLflow runs, read back with the libraries' own readers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from jobs.batch import parse_batch
from jobs.errors import SpecError
from jobs.spec import JobSpec
from tests.conftest import ROOT
from worker.errors import JobError
from worker.pipeline import JobContext, run_job
from worker.trackers import TrackedJob, start_trackers

pytest.importorskip("tensorboard", reason="graftq[tensorboard] is not installed")
pytest.importorskip("mlflow", reason="graftq[mlflow] is not installed")

STEPS = 3


def job_spec(report_to: list[str], **train) -> JobSpec:
    return JobSpec(task="reverse", extension="lora", base_model="random:t5-tiny", device="cpu",
                   lora={"r": 2, "alpha": 4, "dropout": 0.0},
                   train={"dataset": str(ROOT / "examples" / "data" / "reverse.jsonl"), "max_steps": STEPS,
                          "batch_size": 4, "eval_fraction": 0.1, "metrics": ["exact_match"], "num_samples": 0,
                          "max_new_tokens": 4, "checkpoint_every": 0, "report_to": report_to, **train})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def tracked(artifacts):
    """One job trained with both trackers on the default (local) MLflow store."""
    outcome = run_job(JobContext(job_id="job1", batch_id="batch1", spec=job_spec(["tensorboard", "mlflow"]),
                                 artifacts_root=artifacts, params={"lora.r": 2}, batch_name="trackers"))
    return outcome


def mlflow_client(artifacts: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{artifacts / 'mlflow.db'}")


def mlflow_run(artifacts: Path, job_id: str):
    client = mlflow_client(artifacts)
    experiment = client.get_experiment_by_name("graftq")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{job_id}'")
    assert len(runs) == 1
    return client, runs[0]


def test_tensorboard_event_files_hold_the_losses_and_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(tracked.job_dir) / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "eval_loss", "exact_match", "trainable_params"} <= scalars
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2, 3]
    assert [event.step for event in events.Scalars("eval_loss")] == [0, STEPS]
    assert events.Scalars("train_loss")[-1].value == pytest.approx(tracked.metrics["train_loss"], rel=1e-6)
    assert events.Scalars("exact_match")[0].value == pytest.approx(tracked.task_metrics["exact_match"])
    assert not list(Path(tracked.job_dir).parent.glob(".job1.tensorboard"))  # moved into the job directory


def test_mlflow_run_has_the_params_metrics_and_artifacts(tracked, artifacts):
    client, run = mlflow_run(artifacts, "job1")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["lora.r"] == "2" and params["train.max_steps"] == str(STEPS) and params["task"] == "reverse"
    assert params["train.report_to"] == '["tensorboard", "mlflow"]'
    assert run.data.tags["graftq.batch"] == "trackers" and run.data.tags["graftq.job_id"] == "job1"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(metric.step for metric in history) == [1, 2, 3]
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, STEPS]
    assert run.data.metrics["exact_match"] == pytest.approx(tracked.task_metrics["exact_match"])
    assert run.data.metrics["trainable_params"] == tracked.stats["trainable_params"]
    top = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert top == {"job.json", "adapter"}
    adapter = {Path(item.path).name for item in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter


def test_a_failed_attempt_marks_the_run_and_its_retry_goes_on_in_it(tracked, artifacts):
    spec = job_spec(["mlflow", "tensorboard"])
    job = TrackedJob("job2", "batch1", artifacts / "batch1" / "job2")
    trackers = start_trackers(spec, job)
    trackers.log_metrics(1, {"train_loss": 2.0})
    trackers.finish(None)
    client, run = mlflow_run(artifacts, "job2")
    assert run.info.status == "FAILED"
    assert (artifacts / "batch1" / ".job2.tensorboard").is_dir()  # kept for the retry

    trackers = start_trackers(spec, job)
    trackers.log_metrics(2, {"train_loss": 1.0})
    job.job_dir.mkdir(parents=True)
    (job.job_dir / "job.json").write_text("{}")
    trackers.finish(job.job_dir, {"exact_match": 1.0})
    client, run = mlflow_run(artifacts, "job2")
    assert run.info.status == "FINISHED" and run.data.tags["graftq.resumed"] == "true"
    assert [metric.value for metric in client.get_metric_history(run.info.run_id, "train_loss")] == [2.0, 1.0]
    assert run.data.metrics["exact_match"] == 1.0
    assert (job.job_dir / "tensorboard").is_dir() and not (artifacts / "batch1" / ".job2.tensorboard").exists()


@pytest.mark.parametrize(("name", "module", "extra"), [("mlflow", "mlflow.tracking", "graftq[mlflow]"),
                                                        ("tensorboard", "torch.utils.tensorboard",
                                                         "graftq[tensorboard]")])
def test_a_missing_tracker_package_fails_the_job_naming_the_extra(name, module, extra, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to `import`
    with pytest.raises(JobError, match=rf"train\.report_to: {name} needs .*pip install '{re.escape(extra)}'"):
        start_trackers(job_spec([name]), TrackedJob("job3", "batch1", tmp_path / "batch1" / "job3"))
    assert not (tmp_path / "batch1").exists()


def test_report_to_is_validated(tmp_path):
    assert job_spec([]).train.report_to == []
    for value, message in ((["wandb"], "Input should be 'tensorboard' or 'mlflow'"),
                           (["mlflow", "mlflow"], "a tracker is named twice in report_to")):
        with pytest.raises(SpecError, match=message):
            parse_batch({"jobs": [{"task": "t", "extension": "lora", "base_model": "random:t5-tiny",
                                   "train": {"dataset": str(ROOT / "examples" / "data" / "reverse.jsonl"),
                                             "report_to": value}}]})
