"""Classification: encoders (and decoder-only models) that train a head with an extension, the
task-metric registry, and the metrics in `graftq results` / `show`.

The toy task is separable: label `digit` when the input holds a digit, `letters` otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file

from db.session import clear_cache
from jobs.batch import parse_batch
from jobs.cli import cli
from jobs.errors import SpecError
from jobs.metrics import DEFAULT_METRICS, METRICS, check_metrics
from jobs.presets import PRESETS
from jobs.spec import JobSpec
from worker.data import label_ids, label_set
from worker.errors import JobError
from worker.metrics import IMPLEMENTATIONS, accuracy, compute, macro_f1
from worker.models import classification_head
from worker.pipeline import JobContext, load_job_model, run_job


def _toy_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        word = "".join(rng.choice("abcdefghij") for _ in range(6))
        if index % 2:
            position = rng.randrange(6)
            word = word[:position] + str(rng.randrange(10)) + word[position + 1:]
        rows.append({"input": word, "label": "digit" if index % 2 else "letters"})
    return rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _toy_rows(200)))
    return path


def _spec(toy: Path, extension: str, preset: str = "bert-tiny", **train) -> JobSpec:
    return JobSpec.model_validate({
        "task": "toy", "extension": extension, "base_model": f"random:{preset}", "device": "cpu",
        "train": {"dataset": str(toy), "max_steps": 4, "batch_size": 8, "eval_fraction": 0.2,
                  "checkpoint_every": 0, **train}})


def _run(spec: JobSpec, root: Path, job_id: str = "job"):
    return run_job(JobContext(job_id=job_id, batch_id="batch", spec=spec, artifacts_root=root))


# --- the registry and the metric functions --------------------------------------------------------

def test_accuracy_and_macro_f1_on_hand_checked_cases():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # label 0: TP 2, predicted 2, actual 3 -> F1 4/5; label 1: TP 1, predicted 2, actual 1 -> 2/3
    assert macro_f1([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx((0.8 + 2 / 3) / 2)
    # label 2 is never predicted: F1 0 for it; labels 0 and 1 are perfect
    assert macro_f1([0, 1, 1], [0, 1, 2]) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert macro_f1(["a", "a"], ["a", "a"]) == 1.0
    assert compute(["accuracy", "f1"], [], []) == {}
    assert compute(["accuracy"], [1, 0], [1, 1]) == {"accuracy": 0.5}


def test_every_registered_metric_has_an_implementation_and_defaults_apply():
    assert set(IMPLEMENTATIONS) == set(METRICS)
    for objective, names in DEFAULT_METRICS.items():
        assert check_metrics(None, objective) == list(names)
        assert all(objective in METRICS[name].objectives for name in names)
    assert DEFAULT_METRICS["classification"] == ("accuracy", "f1")


@pytest.mark.parametrize(("base", "train", "message"), [
    ("random:bert-tiny", {"metrics": ["meteor"]}, "unknown metric 'meteor'; metrics: accuracy, f1, exact_match"),
    ("random:bert-tiny", {"metrics": ["bleu"]}, "metric 'bleu' does not apply to the classification objective"),
    ("random:t5-tiny", {"metrics": ["accuracy"]}, "metric 'accuracy' does not apply to the seq2seq objective"),
    ("random:bert-tiny", {"objective": "seq2seq"}, "seq2seq is not possible on an encoder-only base model; use "
                                                   "classification"),
    ("random:t5-tiny", {"objective": "classification"}, "classification is not possible on an encoder-decoder"),
    ("random:gpt2-tiny", {"objective": "seq2seq"}, "use causal or classification"),
])
def test_bad_objectives_and_metrics_are_refused_at_validation(base, train, message, toy):
    document = {"jobs": [{"task": "t", "extension": "lora", "base_model": base,
                          "train": {"dataset": str(toy), **train}}]}
    with pytest.raises(SpecError) as error:
        parse_batch(document)
    assert message in str(error.value)


def test_the_objective_defaults_by_family_and_is_recorded():
    def spec(base: str) -> JobSpec:
        return JobSpec.model_validate({"task": "t", "extension": "lora", "base_model": base,
                                       "train": {"dataset": "d.jsonl"}})

    assert (spec("random:bert-tiny").train.objective, spec("random:bert-tiny").train.metrics) == (
        "classification", ["accuracy", "f1"])
    assert spec("random:roberta-tiny").train.objective == "classification"
    assert (spec("random:t5-tiny").train.objective, spec("random:t5-tiny").train.metrics) == (
        "seq2seq", ["exact_match", "char_accuracy"])
    assert spec("random:gpt2-tiny").train.objective == "causal"
    # a hub base's family is read by the worker: nothing is resolved at validation
    assert spec("org/model").train.objective is None


# --- data ----------------------------------------------------------------------------------------

def test_labels_are_sorted_integers_by_value_and_an_unknown_label_names_the_file():
    assert label_set([{"label": "10"}, {"label": "9"}, {"label": "-1"}]) == ["-1", "9", "10"]
    assert label_set([{"label": "b"}, {"label": "a"}, {"label": "b"}]) == ["a", "b"]
    assert label_ids([{"label": "b"}], ["a", "b"], "x.jsonl") == [1]
    with pytest.raises(JobError, match=r"eval\.jsonl has the label 'c'.*labels: a, b"):
        label_ids([{"label": "c"}], ["a", "b"], "eval.jsonl")


def test_batch_validation_wants_a_label_column_for_classification(tmp_path):
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("input,label\nabc,1\ndef,0\n")
    paired = tmp_path / "paired.csv"
    paired.write_text("input,target\nabc,cba\n")

    def problems(base: str, dataset: Path) -> str:
        try:
            parse_batch({"jobs": [{"task": "t", "extension": "lora", "base_model": base,
                                   "train": {"dataset": str(dataset)}}]})
        except SpecError as error:
            return str(error)
        return ""

    assert problems("random:bert-tiny", labelled) == ""
    assert "no column `label`" in problems("random:bert-tiny", paired)
    assert "no column `target`" in problems("random:t5-tiny", labelled)
    # a hub base's objective is the worker's to decide: either kind of data passes here
    assert problems("org/encoder", labelled) == "" and problems("org/encoder", paired) == ""


def test_a_hub_tokenizer_frames_a_classified_sequence_with_its_special_tokens(tmp_path):
    from worker.tokenizer import ByteTokenizer, HFTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "film"]) + "\n")
    tokenizer = HFTokenizer(transformers.BertTokenizer(str(vocab)))
    assert tokenizer.encode_sequence("good film", 16) == [2, 5, 6, 3]  # [CLS] good film [SEP]
    assert len(tokenizer.encode_sequence("good film good film", 4)) == 4
    assert ByteTokenizer().encode_sequence("ab", 2) == [ord("a") + 3, 1]  # truncated, then eos


# --- jobs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, toy):
    """One lora classification job on random:bert-tiny through `graftq run` (the task's code path)."""
    root = tmp_path_factory.mktemp("run")
    url = f"sqlite:///{root / 'results.sqlite'}"
    batch = root / "batch.yaml"
    batch.write_text(f"""
batch: classify
jobs:
  - task: toy
    extension: lora
    base_model: random:bert-tiny
    device: cpu
    train: {{dataset: {toy}, max_steps: 60, batch_size: 16, learning_rate: 0.003, eval_fraction: 0.25,
            checkpoint_every: 0}}
""")
    runner = CliRunner()
    result = runner.invoke(cli, ["--database-url", url, "--artifacts-dir", str(root / "artifacts"), "run", str(batch)])
    assert result.exit_code == 0, result.output
    rows = json.loads(runner.invoke(cli, ["--database-url", url, "results", "--format", "json"]).stdout)
    yield url, rows[0]
    clear_cache()


def _results(url: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--database-url", url, "results", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_lora_classifier_learns_and_records_accuracy_and_f1(lora_run):
    _, row = lora_run
    assert row["status"] == "succeeded"
    assert set(row["metrics"]) == {"accuracy", "f1"}
    # chance is 0.5 on the balanced toy; 60 steps separate it
    assert row["metrics"]["accuracy"] >= 0.75
    assert 0 <= row["metrics"]["f1"] <= 1
    info = json.loads((Path(row["adapter_path"]).parent / "job.json").read_text())
    assert info["labels"] == ["digit", "letters"]
    assert info["spec"]["train"]["objective"] == "classification"
    assert info["task_metrics"] == row["metrics"]


def test_a_lora_classifier_counts_its_head(lora_run):
    _, row = lora_run
    config = PRESETS["bert-tiny"]["config"]
    assert row["head_params"] == config["hidden_size"] * 2 + 2  # BertForSequenceClassification.classifier
    assert row["trainable_params"] == row["lora_params"] + row["head_params"]
    # the base is the classifier without its head
    assert row["total_params"] == row["base_params"] + row["trainable_params"]


def test_results_filter_sort_group_and_show_task_metrics(lora_run):
    url, row = lora_run
    accuracy_ = row["metrics"]["accuracy"]
    reader = csv.DictReader(io.StringIO(_results(url, "--format", "csv")))
    first = next(reader)
    assert float(first["metric.accuracy"]) == accuracy_ and "metrics" not in reader.fieldnames
    assert "metric.accuracy" in _results(url).splitlines()[0]
    ids = [r["id"] for r in json.loads(_results(url, "--where", "metric.accuracy>=0.5", "--format", "json"))]
    assert ids == [row["id"]]
    assert json.loads(_results(url, "--where", "metric.accuracy>1", "--format", "json")) == []
    assert json.loads(_results(url, "--sort", "-metric.f1", "--format", "json"))[0]["id"] == row["id"]
    groups = json.loads(_results(url, "--group-by", "extension", "--agg", "metric.accuracy:mean,count",
                                 "--format", "json"))
    assert groups == [{"extension": "lora", "metric.accuracy_mean": accuracy_, "metric.accuracy_count": 1}]
    shown = CliRunner().invoke(cli, ["--database-url", url, "show", row["id"]]).stdout
    assert "task metrics:" in shown and "accuracy" in shown


def test_a_saved_lora_classifier_loads_in_plain_peft(lora_run):
    _, row = lora_run
    model, tokenizer, info = load_job_model(Path(row["adapter_path"]).parent)
    config = transformers.AutoConfig.for_model(**PRESETS["bert-tiny"]["config"], num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESETS["bert-tiny"]["seed"])
        plain = transformers.AutoModelForSequenceClassification.from_config(config)
    plain = PeftModel.from_pretrained(plain, row["adapter_path"]).eval()
    inputs = torch.tensor([tokenizer.encode_sequence("abc4ef", 16), tokenizer.encode_sequence("abcdef", 16)])
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        got = plain(input_ids=inputs).logits
    torch.testing.assert_close(got, expected)
    assert info["labels"] == ["digit", "letters"]


def test_graftq_predict_gives_a_trained_classifier_s_labels(lora_run, toy):
    url, row = lora_run
    artifacts = Path(row["adapter_path"]).parent.parent.parent
    result = CliRunner().invoke(cli, ["--database-url", url, "--artifacts-dir", str(artifacts), "predict", row["id"],
                                      "--file", str(toy), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line)["prediction"] for line in result.stdout.splitlines() if line.startswith("{")]
    labels = [json.loads(line)["label"] for line in toy.read_text().splitlines()]
    assert set(predictions) == {"digit", "letters"}
    assert accuracy(predictions, labels) >= 0.75  # as on the held-out rows: the model graftq trained


@pytest.mark.parametrize("extension", ["layer", "hybrid"])
def test_layer_and_hybrid_classifiers_train_their_head_and_reload_it(extension, toy, tmp_path):
    outcome = _run(_spec(toy, extension), tmp_path)
    stats = outcome.stats
    assert stats["head_params"] == 130
    assert stats["trainable_params"] == stats["lora_params"] + stats["layer_params"] + stats["head_params"]
    assert set(outcome.task_metrics) == {"accuracy", "f1"}
    assert all(0 <= value <= 1 for value in outcome.task_metrics.values())
    model, _, _ = load_job_model(outcome.job_dir)
    head = classification_head(model)
    if extension == "layer":
        saved = load_file(str(Path(outcome.job_dir) / "head" / "head.safetensors"))
        torch.testing.assert_close(head.state_dict()["weight"], saved["weight"])
    else:
        assert not (Path(outcome.job_dir) / "head").exists()  # PEFT keeps it with the adapter
    fresh = _run(_spec(toy, extension, max_steps=1, learning_rate=1e-6), tmp_path, "other")
    fresh_model, _, _ = load_job_model(fresh.job_dir)
    trained = head.weight if extension == "layer" else head.modules_to_save["task_toy"].weight
    untrained = classification_head(fresh_model)
    untrained = untrained.weight if extension == "layer" else untrained.modules_to_save["task_toy"].weight
    assert not torch.allclose(trained, untrained)


def test_roberta_tiny_and_a_decoder_only_classifier_train(toy, tmp_path):
    roberta = _run(_spec(toy, "lora", "roberta-tiny"), tmp_path, "roberta")
    # RobertaClassificationHead: dense (64 x 64 + 64) and out_proj (64 x 2 + 2)
    assert roberta.stats["head_params"] == 64 * 64 + 64 + 64 * 2 + 2
    assert set(roberta.task_metrics) == {"accuracy", "f1"}
    gpt2 = _run(_spec(toy, "lora", "gpt2-tiny", objective="classification"), tmp_path, "gpt2")
    assert gpt2.stats["head_params"] == 64 * 2  # GPT2ForSequenceClassification.score, no bias
    assert set(gpt2.task_metrics) == {"accuracy", "f1"}


def test_create_on_an_encoder_counts_the_classifier(tmp_path):
    spec = JobSpec.model_validate({"task": "toy", "kind": "create", "extension": "lora",
                                   "base_model": "random:bert-tiny", "device": "cpu"})
    stats = _run(spec, tmp_path).stats
    assert stats["head_params"] == 130
    assert stats["trainable_params"] == stats["lora_params"] + 130


# --- task metrics in the results database, SQLite and PostgreSQL --------------------------------------

def _record_metrics(url: str) -> list[str]:
    """Four succeeded jobs: accuracy 0.9, 0.6, none (a seq2seq job) and 0.75; returns their ids."""
    from sqlalchemy import update

    from db.session import get_database
    from db.submission import create_batch
    from db.tables import jobs

    scores = [{"accuracy": 0.9, "f1": 0.8}, {"accuracy": 0.6, "f1": 0.5}, {}, {"accuracy": 0.75, "f1": 0.7}]
    database = get_database(url)
    rows = [{"task": "t", "kind": "train", "extension": extension, "base_model": "random:bert-tiny",
             "queue": "graftq", "spec": {"task": "t"}} for extension in ("lora", "lora", "layer", "layer")]
    with database.begin() as connection:
        _, ids = create_batch(connection, "scores", rows)
        for job_id, metrics in zip(ids, scores, strict=True):
            connection.execute(update(jobs).where(jobs.c.id == job_id).values(status="succeeded", metrics=metrics))
    return ids


def _check_metric_queries(url: str, ids: list[str]) -> None:
    def ids_of(*args: str) -> list[str]:
        return [row["id"] for row in json.loads(_results(url, *args, "--format", "json"))]

    assert set(ids_of("--where", "metric.accuracy>0.7")) == {ids[0], ids[3]}
    assert set(ids_of("--where", "metric.f1<=0.5")) == {ids[1]}
    assert ids_of("--sort", "metric.accuracy") == [ids[1], ids[3], ids[0], ids[2]]  # the job without it last
    assert ids_of("--sort", "-metric.accuracy", "--limit", "2") == [ids[0], ids[3]]
    assert json.loads(_results(url, "--format", "json", "--sort", "metric.accuracy"))[-1]["metrics"] == {}
    groups = json.loads(_results(url, "--group-by", "extension", "--agg", "metric.accuracy:mean,count",
                                 "--format", "json"))
    assert groups == [{"extension": "layer", "metric.accuracy_mean": 0.75, "metric.accuracy_count": 1},
                      {"extension": "lora", "metric.accuracy_mean": pytest.approx(0.75),
                       "metric.accuracy_count": 2}]


def test_metric_keys_filter_sort_and_aggregate_on_sqlite(sqlite_url):
    from db.session import create_database_engine, upgrade_to_head

    engine = create_database_engine(sqlite_url)
    upgrade_to_head(sqlite_url, engine)
    engine.dispose()
    try:
        _check_metric_queries(sqlite_url, _record_metrics(sqlite_url))
        table = _results(sqlite_url).splitlines()[0].split()
        assert table[-2:] == ["metric.accuracy", "metric.f1"]
    finally:
        clear_cache()


@pytest.mark.postgres
def test_metric_keys_filter_sort_and_aggregate_on_postgresql(postgres_database):
    from db.session import create_database_engine, upgrade_to_head

    engine = create_database_engine(postgres_database)
    upgrade_to_head(postgres_database, engine)
    engine.dispose()
    _check_metric_queries(postgres_database, _record_metrics(postgres_database))


def test_the_classification_example_validates():
    from jobs.batch import load_batch

    batch = load_batch(Path(__file__).resolve().parent.parent / "examples" / "classify.yaml")
    assert len(batch.jobs) == 6
    assert {spec.train.objective for spec in batch.jobs} == {"classification"}
    assert {spec.base_model for spec in batch.jobs} == {"random:bert-tiny", "random:roberta-tiny"}
