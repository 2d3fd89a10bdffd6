"""`train.report_to`: TensorBoard event files and MLflow runs, read back with the libraries' own readers."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from jobs.batch import parse_batch
from jobs.cli import cli
from jobs.errors import SpecError
from jobs.spec import JobSpec
from tests.conftest import ROOT
from worker.errors import JobError
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
    return tmp_path_factory.mktemp("trackers") / "artifacts"


@dataclass
class Tracked:
    job_id: str
    job_dir: Path
    job: dict


@pytest.fixture(scope="module")
def tracked(artifacts) -> Tracked:
    """One job of a sweep, run with `graftq run` and both trackers on the default (local) MLflow store."""
    spec = job_spec(["tensorboard", "mlflow"]).to_json()
    batch = artifacts.parent / "batch.yaml"
    batch.write_text(yaml.safe_dump({"batch": "trackers", "matrix": {"lora.r": [2]},
                                     "jobs": [{key: spec[key] for key in ("task", "extension", "base_model",
                                                                          "device", "train")}]}))
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{artifacts.parent / 'graftq.db'}",
                                      "--artifacts-dir", str(artifacts), "run", str(batch)])
    assert result.exit_code == 0, result.output
    (job_dir,) = [path.parent for path in artifacts.glob("*/*/job.json")]
    return Tracked(job_dir.name, job_dir, json.loads((job_dir / "job.json").read_text()))


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

    events = EventAccumulator(str(tracked.job_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "eval_loss", "exact_match", "trainable_params"} <= scalars
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2, 3]
    assert [event.step for event in events.Scalars("eval_loss")] == [0, STEPS]
    assert events.Scalars("train_loss")[-1].value == pytest.approx(tracked.job["metrics"]["train_loss"], rel=1e-6)
    assert events.Scalars("exact_match")[0].value == pytest.approx(tracked.job["task_metrics"]["exact_match"])
    assert not list(tracked.job_dir.parent.glob(".*.tensorboard"))  # moved into the job directory


def test_mlflow_run_has_the_params_metrics_and_artifacts(tracked, artifacts):
    client, run = mlflow_run(artifacts, tracked.job_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["lora.r"] == "2" and params["train.max_steps"] == str(STEPS) and params["task"] == "reverse"
    assert params["train.report_to"] == '["tensorboard", "mlflow"]'
    assert run.data.tags["graftq.batch"] == "trackers" and run.data.tags["graftq.job_id"] == tracked.job_id
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(metric.step for metric in history) == [1, 2, 3]
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, STEPS]
    assert run.data.metrics["exact_match"] == pytest.approx(tracked.job["task_metrics"]["exact_match"])
    assert run.data.metrics["trainable_params"] == tracked.job["stats"]["trainable_params"]
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
