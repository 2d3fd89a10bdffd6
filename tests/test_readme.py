"""Every command the README shows is run here (or, for docker/make, checked where it can be).

The README is the user's contract: a command added to it without a test here fails
`test_every_readme_command_is_exercised`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import WorkerProcess, graftq_argv
from tests.test_demo import demo_directory

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# command (as the README shows it) -> the test below that runs it
EXERCISED = {
    "make demo": "test_make_targets_run_what_the_readme_says",
    "make test": "test_make_targets_run_what_the_readme_says",
    "make bench": "test_make_targets_run_what_the_readme_says",
    "python scripts/pretrain_demo_base.py": "test_single_machine_commands",  # shortened: tests.test_demo
    "graftq run examples/quickstart.yaml": "test_single_machine_commands",
    "graftq results --task reverse --sort eval_loss --format csv": "test_single_machine_commands",
    "graftq show JOB_ID": "test_single_machine_commands",
    # validated structurally (and with `docker compose config` where a compose tool exists)
    "docker compose up -d --build": "tests/test_deployment.py",
    "graftq db upgrade": "test_pool_commands",
    "graftq worker --gpus all": "test_pool_commands",
    "scripts/gpu-check.sh": "tests/test_gpu_launch.py",
    "export GRAFTQ_BROKER_URL=redis://:PASSWORD@gpu-host:6379/0": "test_pool_commands",
    "export GRAFTQ_DATABASE_URL=postgresql+psycopg://graftq:PASSWORD@gpu-host:5432/graftq": "test_pool_commands",
    "graftq submit examples/quickstart.yaml --dry-run": "test_pool_commands",
    "graftq submit examples/quickstart.yaml": "test_pool_commands",
    "graftq status --watch": "test_pool_commands",
    "graftq results --batch quickstart --format json": "test_pool_commands",
    "graftq cancel --batch BATCH_ID": "test_pool_commands",
    "graftq submit examples/sweep.yaml --dry-run": "test_campaign_commands",
    "graftq run examples/sweep.yaml": "test_campaign_commands",
    "graftq results --batch sweep --group-by lora.r,train.learning_rate --agg eval_loss:mean,std,min,count":
        "test_campaign_commands",
    "graftq run examples/shared_layer.yaml": "test_campaign_commands",
    "graftq retry --batch BATCH_ID": "test_campaign_commands",
    "graftq report sweep --out graftq-data/report.html": "tests/test_report.py",
    'graftq predict JOB_ID --input "hello" --input "graftq"': "test_predict_export_commands",
    "graftq predict JOB_ID --file examples/data/reverse.jsonl --out predictions.jsonl":
        "test_predict_export_commands",
    "graftq export JOB_ID exported/": "test_predict_export_commands",
    "graftq export JOB_ID merged/ --merge": "test_predict_export_commands",
}
QUICKSTART_JOBS = 12
QUICKSTART_STEPS = 5  # `graftq run --max-steps`: the README's queries hold after any number of steps


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def shell_commands() -> list[str]:
    return [line.strip() for block in blocks("bash") for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_every_readme_command_is_exercised():
    assert sorted(set(shell_commands())) == sorted(EXERCISED)
    for test in set(EXERCISED.values()):
        assert test.startswith("tests/") and (ROOT / test).exists() or test in globals(), test


def test_batch_reference_is_generated_from_the_specs():
    from jobs.spec import batch_reference_markdown

    section = README.split("<!-- batch-reference:start -->\n", 1)[1].split("<!-- batch-reference:end -->", 1)[0]
    assert section == batch_reference_markdown(), "regenerate with `python scripts/update_readme.py`"


def test_readme_batch_example_is_a_valid_batch(tmp_path):
    from jobs.batch import load_batch

    example = next(block for block in blocks("yaml") if block.startswith("batch:"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reverse.jsonl").write_text((ROOT / "examples/data/reverse.jsonl").read_text())
    (tmp_path / "batch.yaml").write_text(example)
    batch = load_batch(tmp_path / "batch.yaml")
    assert [(job.task, job.extension, job.kind.value) for job in batch.jobs] == [
        ("reverse", "lora", "train"), ("reverse", "layer", "train"), ("reverse", "hybrid", "train"),
        ("stats-only", "hybrid", "create")]


def test_command_table_lists_exactly_the_cli_commands():
    from jobs.cli import cli

    table = re.findall(r"^\| `graftq (\w+)", README, re.M)
    assert sorted(table) == sorted(cli.commands)


def test_result_field_list_is_generated_from_the_field_declarations():
    from db.tables import result_fields_markdown

    section = README.split("<!-- result-fields:start -->\n", 1)[1].split("<!-- result-fields:end -->", 1)[0]
    assert section == result_fields_markdown(), "regenerate with `python scripts/update_readme.py`"


def test_make_targets_run_what_the_readme_says():
    def dry_run(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    assert re.search(r"graftq\"? run examples/quickstart\.yaml", dry_run("demo"))
    assert re.search(r"graftq\"? results", dry_run("demo"))
    test = dry_run("test")
    assert "ruff\" check ." in test and "pytest" in test
    assert "benchmarks/run_all.py" in dry_run("bench")
    help_text = subprocess.run([sys.executable, "benchmarks/run_all.py", "--help"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert "--quick" in help_text
    assert "make test" in (ROOT / ".ci/run").read_text()


def _graftq(env: dict, *args: str, timeout: float = 600, check: bool = True, cwd: Path = ROOT
            ) -> subprocess.CompletedProcess:
    result = subprocess.run(graftq_argv(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"graftq {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_single_machine_commands(graftq_env, sqlite_url, artifacts_dir, tmp_path):
    """The quickstart as the README shows it, shortened with the README's `--max-steps` (`make demo`
    runs it at full length) and run where a briefly trained demo base lies, then the README's
    queries on its results."""
    demo = demo_directory(tmp_path / "demo")
    _graftq(graftq_env, "run", "examples/quickstart.yaml", "--max-steps", str(QUICKSTART_STEPS), cwd=demo)

    rows = list(csv.DictReader(io.StringIO(
        _graftq(graftq_env, "results", "--task", "reverse", "--sort", "eval_loss", "--format", "csv").stdout)))
    assert sorted(row["extension"] for row in rows) == ["hybrid", "layer", "lora", "lora"]  # a lora is the base
    losses = [float(row["eval_loss"]) for row in rows]
    assert losses == sorted(losses) and all(row["status"] == "succeeded" for row in rows)

    shown = _graftq(graftq_env, "show", rows[0]["id"]).stdout
    assert rows[0]["id"] in shown and str(artifacts_dir) in shown and "eval_loss" in shown

    database = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    best, curve = (database.execute(query).fetchall() for query in blocks("sql"))
    # per task, the base (a 0-step lora job) and each extension kind
    assert {(task, extension): count for task, extension, _, count in best} == {
        (task, extension): 2 if extension == "lora" else 1
        for task in ("reverse", "uppercase", "sort_digits") for extension in ("lora", "layer", "hybrid")}
    # an eval point before training and one after for the 9 trained jobs, the step-0 one for the 3 bases
    assert len(curve) == 21 and {step for *_, step, _ in curve} == {0, QUICKSTART_STEPS}

    namespace: dict = {}
    exec(compile(blocks("python")[0], "README.md", "exec"), namespace)  # the From Python example
    assert namespace["extension"].statistics("reverse").trainable_params > 0
    assert Path(namespace["paths"]["adapter"], "adapter_config.json").exists()


@pytest.mark.slow
def test_pool_commands(graftq_env, redis_url, redis_server, sqlite_url, tmp_path):
    """submit --dry-run, db upgrade, submit, a real `graftq worker --gpus all`, cancel, status, results.
    Submitted and served where a briefly trained demo base lies: the quickstart's base_model is relative."""
    env = dict(graftq_env, GRAFTQ_BROKER_URL=redis_url, GRAFTQ_DATABASE_URL=sqlite_url,
               GRAFTQ_HEARTBEAT_INTERVAL="1")
    demo = demo_directory(tmp_path / "demo")

    dry = _graftq(env, "submit", "examples/quickstart.yaml", "--dry-run", cwd=demo).stdout
    assert dry.count("reverse") >= 3 and not Path(sqlite_url.removeprefix("sqlite:///")).exists()
    assert sum(redis_server.queue_lengths().values()) == 0

    _graftq(env, "db", "upgrade")
    submitted = _graftq(env, "submit", "examples/quickstart.yaml", cwd=demo).stdout
    batch_id = re.search(r"\b([0-9a-f]{16})\b", submitted).group(1)
    assert sum(redis_server.queue_lengths().values()) == QUICKSTART_JOBS

    def first_success() -> bool:
        return "succeeded" in [job["status"] for job in json.loads(_graftq(
            env, "results", "--batch", "quickstart", "--format", "json").stdout)]

    with WorkerProcess(env, "--gpus", "all", cwd=demo) as worker:
        worker.wait_for(first_success, timeout=240, what="the worker's first finished job")
        _graftq(env, "cancel", "--batch", batch_id)
        status = _graftq(env, "status", "--watch", timeout=120).stdout
        assert batch_id in status or "quickstart" in status
    output = worker.output
    assert "CPU worker" in output  # no GPU here: --gpus all says so and serves on the CPU

    jobs = json.loads(_graftq(env, "results", "--batch", "quickstart", "--format", "json").stdout)
    assert len(jobs) == QUICKSTART_JOBS and {job["batch_id"] for job in jobs} == {batch_id}
    assert {job["status"] for job in jobs} <= {"succeeded", "cancelled"} and "succeeded" in {
        job["status"] for job in jobs}
    assert not [job for job in jobs if job["status"] == "succeeded" and not Path(job["adapter_path"] or
                                                                                  job["layer_path"]).is_dir()]


CAMPAIGN_STEPS = 3  # `--max-steps`: the campaign's mechanics hold after any number of steps


@pytest.mark.slow
def test_campaign_commands(graftq_env, redis_url, sqlite_url, monkeypatch):
    """The two campaign examples with `graftq run` (the README's commands, shortened with
    `--max-steps`), the grouped results against a hand computation, retry, and the pipeline
    again through `graftq submit` and a real worker: each child after the job it needs."""
    import statistics

    env = dict(graftq_env, GRAFTQ_BROKER_URL=redis_url, GRAFTQ_DATABASE_URL=sqlite_url,
               GRAFTQ_HEARTBEAT_INTERVAL="1")
    dry = _graftq(env, "submit", "examples/sweep.yaml", "--dry-run").stdout
    assert "8 jobs" in dry and "train.learning_rate" in dry
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists()

    steps = ("--max-steps", str(CAMPAIGN_STEPS))
    from click.testing import CliRunner

    from jobs.cli import cli

    monkeypatch.chdir(ROOT)

    def run_here(*args: str) -> None:
        # `graftq run` in this process (click's runner): the command is the same, torch is imported once
        result = CliRunner(env=env).invoke(cli, ["run", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    run_here("examples/sweep.yaml", *steps)
    jobs = json.loads(_graftq(env, "results", "--batch", "sweep", "--format", "json").stdout)
    assert len(jobs) == 8 and {job["status"] for job in jobs} == {"succeeded"}
    groups = json.loads(_graftq(env, "results", "--batch", "sweep", "--group-by", "lora.r,train.learning_rate",
                                "--agg", "eval_loss:mean,std,min,count", "--format", "json").stdout)
    assert len(groups) == 4
    for group in groups:
        losses = [job["eval_loss"] for job in jobs if job["params"]["lora.r"] == group["lora.r"]
                  and job["params"]["train.learning_rate"] == group["train.learning_rate"]]
        assert group["eval_loss_count"] == len(losses) == 2
        assert group["eval_loss_mean"] == pytest.approx(statistics.mean(losses))
        assert group["eval_loss_std"] == pytest.approx(statistics.stdev(losses))
        assert group["eval_loss_min"] == min(losses)

    run_here("examples/shared_layer.yaml", *steps)
    pipeline = {job["task"]: job for job in json.loads(
        _graftq(env, "results", "--batch", "shared-layer", "--format", "json").stdout)}
    assert {job["status"] for job in pipeline.values()} == {"succeeded"} and len(pipeline) == 5
    assert pipeline["reverse-frozen-block"]["layer_params"] == 0 < pipeline["reverse"]["layer_params"]
    assert pipeline["reverse-frozen-block"]["total_params"] == pipeline["reverse"]["total_params"]
    retried = _graftq(env, "retry", "--batch", pipeline["reverse"]["batch_id"]).stdout
    assert "0 queued" in retried and "5 succeeded" in retried  # nothing failed: nothing to run again

    # the pipeline through a pool (the sweep has no dependencies: a pool runs it as any batch)
    batch_id = re.search(r"\b([0-9a-f]{16})\b",
                         _graftq(env, "submit", "examples/shared_layer.yaml", *steps).stdout).group(1)
    pooled: list[dict] = []

    def finished() -> bool:
        pooled[:] = json.loads(_graftq(env, "results", "--batch", batch_id, "--format", "json").stdout)
        return all(job["status"] in ("succeeded", "failed", "skipped") for job in pooled)

    with WorkerProcess(env, "--gpus", "none") as worker:
        worker.wait_for(finished, timeout=240, what="the pipeline example")
    assert len(pooled) == 5 and {job["status"] for job in pooled} == {"succeeded"}
    assert all(job["attempts"] == 1 for job in pooled)
    shared = next(job for job in pooled if job["task"] == "all-tasks")
    children = [job for job in pooled if job["batch_id"] == shared["batch_id"] and job is not shared]
    assert len(children) == 4 and all(child["started_at"] >= shared["finished_at"] for child in children)


@pytest.mark.slow
def test_predict_export_commands(graftq_env, tmp_path, monkeypatch):
    """The README's predict and export commands, as shown, on a hybrid job of `graftq run`, run from a
    directory that holds the README's relative paths. In this process (click's runner): the commands
    are the same, and torch is imported once rather than by each."""
    import shlex

    from click.testing import CliRunner

    from jobs.cli import cli

    # one thread per process: generation on an oversubscribed machine otherwise waits on OpenMP teams
    graftq_env = dict(graftq_env, OMP_NUM_THREADS="1")
    # the README's file, cut to its first rows: the command is the same, the generation is short
    (tmp_path / "examples" / "data").mkdir(parents=True)
    for source in (ROOT / "examples" / "data").glob("*.jsonl"):
        (tmp_path / "examples" / "data" / source.name).write_text(
            "".join(source.read_text().splitlines(keepends=True)[:12]))
    (tmp_path / "batch.yaml").write_text(
        "batch: readme-predict\nbase_model: random:t5-tiny\njobs:\n"
        "  - {task: reverse, extension: hybrid, layer: {stack: decoder, init_scale: 0.5},\n"
        "     train: {dataset: examples/data/reverse.jsonl, max_steps: 2, batch_size: 4}}\n")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env=graftq_env)

    def graftq(*args: str) -> str:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, f"graftq {' '.join(args)}: {result.output}"
        return result.stdout

    graftq("run", str(tmp_path / "batch.yaml"))
    job_id = json.loads(graftq("results", "--batch", "readme-predict", "--format", "json"))[0]["id"]
    commands = [line for line in shell_commands() if line.startswith(("graftq predict", "graftq export"))]
    assert len(commands) == 4
    outputs = [graftq(*shlex.split(command.replace("JOB_ID", job_id))[1:]) for command in commands]
    assert [json.loads(line)["input"] for line in outputs[0].splitlines()] == ["hello", "graftq"]
    rows = [json.loads(line) for line in (tmp_path / "examples/data/reverse.jsonl").read_text().splitlines()]
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(p["input"], p["target"]) for p in predictions] == [(r["input"], r["target"]) for r in rows]
    assert {"adapter", "layer", "README.md"} <= {path.name for path in (tmp_path / "exported").iterdir()}
    assert (tmp_path / "merged" / "config.json").is_file() and "AutoModelForSeq2SeqLM" in outputs[3]
