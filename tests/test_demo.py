"""The demo: the copy-task base model that scripts/pretrain_demo_base.py trains (deterministic,
skipped when up to date, loadable by graftq and by plain transformers), the quickstart batch on it
(a 0-step job per task scores the base model), and what `make demo` runs.

`tests/test_readme.py` runs the quickstart itself on a base trained for a few steps (`demo_directory`).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_STEPS = 3  # enough to show the recipe's determinism; the demo trains far longer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pretrain_script():
    """scripts/pretrain_demo_base.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("pretrain_demo_base", ROOT / "scripts" / "pretrain_demo_base.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def demo_directory(directory: Path, steps: int = TINY_STEPS) -> Path:
    """`directory` laid out as the quickstart expects where graftq runs: `examples/` (this checkout's)
    and `graftq-data/demo-base`, a copy-task base trained for `steps` steps."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    script = pretrain_script()
    # the README's command, shortened (as `graftq run --max-steps` shortens a batch)
    assert script.main(["--out", str(directory / script.DEFAULT_OUT), "--steps", str(steps)]) == 0
    return directory


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A demo directory (see `demo_directory`), shared by this file's tests."""
    return demo_directory(tmp_path_factory.mktemp("demo"))


def test_pretraining_is_deterministic_skipped_when_up_to_date_and_loadable(demo, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from worker.device import DeviceManager
    from worker.models import load_base_model
    from worker.tokenizer import ByteTokenizer

    script = pretrain_script()
    recipe = dict(script.RECIPE, steps=TINY_STEPS)
    first, second = demo / script.DEFAULT_OUT, tmp_path / "second"
    records = [script.read_record(first), script.build(second, recipe, log=lambda line: None)]
    assert records[0]["fingerprint"] == records[1]["fingerprint"] == script.fingerprint(recipe)
    weights = [load_file(str(directory / "model.safetensors")) for directory in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][name].equal(weights[1][name]) for name in weights[0])
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left behind

    # up to date: nothing is trained or written; another recipe (here: more steps) would train again
    written = (second / "model.safetensors").stat().st_mtime_ns
    said: list[str] = []
    assert script.build(second, recipe, log=said.append) == records[1]
    assert "up to date" in said[0] and (second / "model.safetensors").stat().st_mtime_ns == written
    assert script.is_current(second, recipe) and not script.is_current(second, dict(recipe, steps=TINY_STEPS + 1))

    base = load_base_model(str(second), DeviceManager("cpu"))
    assert base.arch.family == "t5" and isinstance(base.tokenizer, ByteTokenizer)
    assert sum(p.numel() for p in base.model.parameters()) == records[1]["parameters"]
    plain = transformers.AutoTokenizer.from_pretrained(second)
    assert plain("aZ9")["input_ids"] == ByteTokenizer().encode("aZ9") + [ByteTokenizer.eos_token_id]
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(second)
    assert model.generate(**plain(["abc"], return_tensors="pt"), max_new_tokens=3).shape[0] == 1


def test_the_quickstart_compares_each_kind_with_its_base_model_per_task(demo, monkeypatch):
    from jobs.batch import load_batch

    monkeypatch.chdir(demo)  # the base model's relative path is read from where graftq runs
    batch = load_batch(demo / "examples" / "quickstart.yaml")
    by_task: dict[str, list] = {}
    for spec in batch.jobs:
        by_task.setdefault(spec.task, []).append(spec)
    assert sorted(by_task) == ["reverse", "sort_digits", "uppercase"]
    for task, specs in by_task.items():
        base, *adapted = specs
        assert (base.name, base.extension, base.train.max_steps) == (f"{task}-base", "lora", 0)
        assert [spec.extension for spec in adapted] == ["lora", "layer", "hybrid"]
        assert all(spec.train.max_steps > 0 for spec in adapted)
        assert all("exact_match" in spec.train.metrics for spec in specs)
        assert len({spec.train.dataset for spec in specs}) == 1
        assert {spec.base_model for spec in specs} == {"./graftq-data/demo-base"}


def test_a_zero_step_lora_job_scores_the_base_model_itself(demo, tmp_path):
    """max_steps: 0 trains nothing: the job's exact match is the base model's on the eval split, and
    its curve is the one step-0 evaluation."""
    import torch

    from jobs.spec import JobSpec
    from worker.data import read_training_rows
    from worker.device import DeviceManager
    from worker.models import load_base_model
    from worker.pipeline import JobContext, run_job
    from worker.predict import GenerationSettings, Predictor

    base_dir = demo / "graftq-data" / "demo-base"
    spec = JobSpec.model_validate({
        "task": "reverse", "extension": "lora", "base_model": str(base_dir), "device": "cpu",
        "train": {"dataset": str(ROOT / "examples" / "data" / "reverse.jsonl"), "max_steps": 0,
                  "eval_fraction": 0.05, "max_length": 32, "max_new_tokens": 4, "metrics": ["exact_match",
                                                                                            "char_accuracy"],
                  "checkpoint_every": 0}})
    outcome = run_job(JobContext(job_id="base0", batch_id="demo", spec=spec, artifacts_root=tmp_path / "artifacts"))
    assert outcome.metrics["steps"] == 0 and outcome.metrics["train_loss"] is None
    assert [(step, split) for step, split, _ in outcome.loss_curve] == [(0, "eval")]
    assert outcome.metrics["eval_loss"] == outcome.loss_curve[0][2]

    base = load_base_model(str(base_dir), DeviceManager("cpu"))
    _, eval_rows = read_training_rows(spec.train)
    predictor = Predictor(model=base.model, tokenizer=base.tokenizer, info={}, device=torch.device("cpu"),
                          max_length=32, task_type="seq2seq", max_new_tokens=4)
    predictions = [line["prediction"] for line in predictor.predict(
        [{"input": row["input"]} for row in eval_rows], GenerationSettings(max_new_tokens=4), batch_size=8)]
    from worker.metrics import compute

    assert outcome.task_metrics == pytest.approx(compute(["exact_match", "char_accuracy"], predictions,
                                                         [row["target"] for row in eval_rows]))


def test_a_missing_base_directory_says_where_it_was_looked_for_and_how_to_make_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from jobs.cli import cli
    from jobs.spec import JobSpec
    from worker.errors import JobError
    from worker.pipeline import JobContext, run_job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    # `graftq run` refuses the batch before anything is written
    refused = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{tmp_path / 'graftq.db'}", "run",
                                       "examples/quickstart.yaml"])
    assert refused.exit_code != 0 and "'./graftq-data/demo-base' does not exist" in refused.output
    assert "python scripts/pretrain_demo_base.py" in refused.output and not (tmp_path / "graftq.db").exists()
    # a worker elsewhere (its own working directory) says the same when the job reaches it
    spec = JobSpec.model_validate({
        "task": "reverse", "extension": "lora", "base_model": "./graftq-data/demo-base", "device": "cpu",
        "train": {"dataset": str(ROOT / "examples" / "data" / "reverse.jsonl"), "max_steps": 1}})
    with pytest.raises(JobError) as raised:
        run_job(JobContext(job_id="nobase", batch_id="demo", spec=spec, artifacts_root=tmp_path / "artifacts"))
    message = str(raised.value)
    assert str(tmp_path / "graftq-data" / "demo-base") in message
    assert "scripts/pretrain_demo_base.py" in message and "huggingface-cli" not in message


def test_make_demo_pretrains_runs_the_quickstart_writes_the_report_and_prints_the_table():
    commands = subprocess.run(["make", "-n", "-o", "install", "demo"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    steps = [re.search(pattern, commands).start() for pattern in (
        r"python\"? scripts/pretrain_demo_base\.py", r"graftq\"? run examples/quickstart\.yaml",
        r"graftq\"? report --metric exact_match --out graftq-data/report\.html", r"echo \"report: .*report\.html\"",
        r"graftq\"? results --batch \"\$batch\"")]
    assert steps == sorted(steps)
