"""Training, saving and loading back: the pipeline as a plain library (no queue)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from jobs.spec import JobSpec
from worker.data import IGNORE_INDEX, Example, StepBatches, collate
from worker.errors import ConfigError, JobCancelled, JobError
from worker.models import build_random_preset, save_base_model
from worker.pipeline import JobContext, load_job_model, run_job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def make_spec(extension="lora", preset="t5-tiny", kind="train", **train):
    train_spec = {"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 2, "batch_size": 8,
                  "learning_rate": 1e-3, "seed": 0, **train}
    return JobSpec(task="reverse", kind=kind, extension=extension, base_model=f"random:{preset}", device="cpu",
                   lora={"r": 4, "alpha": 8, "dropout": 0.0}, train=train_spec if kind == "train" else None)


def run(spec, tmp_path, job_id="job1", **ctx):
    return run_job(JobContext(job_id=job_id, batch_id="batch1", spec=spec, artifacts_root=tmp_path, **ctx))


# Recorded on CPU (torch 2.13, transformers 5.23, peft 0.21): the first two training losses of a
# seed-0 LoRA job on random:t5-tiny. A change here means training no longer does what it did.
RECORDED_T5_LORA_LOSSES = [6.071005, 6.146321]


def test_collate_pads_inputs_masks_and_labels_on_the_right():
    batch = [Example(input_ids=[5, 6, 7], labels=[8]), Example(input_ids=[9], labels=[10, 11])]
    seq2seq = collate(batch, "seq2seq", pad_id=0)
    assert seq2seq["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert seq2seq["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert seq2seq["labels"].tolist() == [[8, IGNORE_INDEX], [10, 11]]
    assert {tensor.dtype for tensor in seq2seq.values()} == {torch.long}
    # causal: labels are as wide as the inputs (the prompt part is already IGNORE_INDEX)
    causal = collate([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4], [4])], "causal", pad_id=0)
    assert causal["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert causal["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_step_batches_depend_on_the_step_only_as_a_resumed_job_needs():
    examples = [Example([index], [index]) for index in range(10)]
    in_order = StepBatches(examples, batch_size=4, seed=3)
    first = [[e.input_ids[0] for e in in_order.batch(step)] for step in range(12)]  # 4.8 epochs
    resumed = StepBatches(examples, batch_size=4, seed=3)
    assert [[e.input_ids[0] for e in resumed.batch(step)] for step in range(7, 12)] == first[7:]
    assert [e.input_ids[0] for e in resumed.batch(0)] == first[0]  # an earlier epoch, again
    assert sorted(sum(first[:5], [])) == sorted(list(range(10)) * 2)  # each epoch is a permutation


def test_tokens_per_second_counts_the_inputs_and_labels_each_step_trained_on(tmp_path):
    from worker.data import read_rows, split, tokenize
    from worker.tokenizer import ByteTokenizer

    spec = make_spec(max_steps=3)
    outcome = run(spec, tmp_path)
    examples = tokenize(read_rows(spec.train.dataset), ByteTokenizer(), "seq2seq", spec.train.max_length)
    train_set, _ = split(examples, spec.train.eval_fraction, spec.train.seed)
    steps = StepBatches(train_set, spec.train.batch_size, spec.train.seed)
    expected = 0
    for step in range(3):  # what the padded batches' masks count: real input tokens + real label tokens
        batch = collate(steps.batch(step), "seq2seq", pad_id=0)
        expected += int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())
    metrics = outcome.metrics
    assert metrics["tokens_per_second"] * metrics["train_seconds"] == pytest.approx(expected, rel=1e-6)


def test_two_step_regression_against_recorded_losses(tmp_path):
    outcome = run(make_spec(), tmp_path)
    losses = [loss for _, split, loss in outcome.loss_curve if split == "train"]
    assert losses == pytest.approx(RECORDED_T5_LORA_LOSSES, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("extension,preset,ratio", [
    ("lora", "t5-tiny", 0.75), ("hybrid", "t5-tiny", 0.7),
    # a random decoder-only base learns string reversal slowly from one added block: a weaker bar
    ("hybrid", "llama-tiny", 0.95),
])
def test_training_lowers_eval_loss_well_below_its_start(extension, preset, ratio, tmp_path):
    outcome = run(make_spec(extension, preset, max_steps=80, batch_size=16, learning_rate=3e-3), tmp_path)
    metrics = outcome.metrics
    assert metrics["steps"] == 80
    [initial_eval_loss] = [loss for step, split, loss in outcome.loss_curve if (step, split) == (0, "eval")]
    assert metrics["eval_loss"] < ratio * initial_eval_loss, metrics
    assert metrics["tokens_per_second"] > 0 and metrics["train_seconds"] > 0 and metrics["peak_memory_mb"] > 0


@pytest.mark.parametrize("extension,preset", [
    ("lora", "t5-tiny"), ("layer", "t5-tiny"), ("hybrid", "t5-tiny"),
    ("lora", "gpt2-tiny"), ("hybrid", "llama-tiny"),
])
def test_save_and_load_round_trip_is_bit_exact(extension, preset, tmp_path):
    outcome = run(make_spec(extension, preset, max_steps=5), tmp_path)
    job_dir = Path(outcome.job_dir)
    assert job_dir == tmp_path / "batch1" / "job1"
    assert (outcome.adapter_path is not None) == (extension != "layer")
    assert (outcome.layer_path is not None) == (extension != "lora")
    if outcome.adapter_path:
        assert {p.name for p in Path(outcome.adapter_path).iterdir()} == {"adapter_config.json",
                                                                          "adapter_model.safetensors"}
    if outcome.layer_path:
        assert {p.name for p in Path(outcome.layer_path).iterdir()} == {"layer.safetensors", "extension.json"}
    info = json.loads((job_dir / "job.json").read_text())
    assert info["stats"] == outcome.stats and info["spec"]["extension"] == extension
    assert not [p for p in job_dir.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]

    # The in-memory trained model is gone with the job; rebuild it twice and compare with a fresh
    # training run's saved weights through the forward pass.
    model, tokenizer, _ = load_job_model(job_dir)
    again, _, _ = load_job_model(job_dir)
    ids = torch.tensor([tokenizer.encode("hello") + [1]])
    with torch.no_grad():
        kwargs = {"decoder_input_ids": ids[:, :3]} if preset.startswith("t5") else {}
        first = model(input_ids=ids, **kwargs).logits
        second = again(input_ids=ids, **kwargs).logits
        base, _ = build_random_preset(preset)
        plain = base.eval()(input_ids=ids, **kwargs).logits
    assert torch.equal(first, second)
    assert not torch.equal(first, plain)  # the trained extension is really applied


def test_reloaded_model_equals_the_trained_one(tmp_path):
    """Capture the trained model's output inside the job (through the progress hook's last call)."""
    from worker import pipeline

    captured = {}
    original = pipeline._write_artifacts

    def spy(extension, spec, payload, directory):
        model = extension.model_for(spec.task).eval()
        with torch.no_grad():
            captured["logits"] = model(input_ids=torch.tensor([[10, 20, 30, 1]]),
                                        decoder_input_ids=torch.tensor([[0, 10]])).logits
        return original(extension, spec, payload, directory)

    pipeline._write_artifacts = spy
    try:
        outcome = run(make_spec("hybrid", max_steps=5), tmp_path)
    finally:
        pipeline._write_artifacts = original
    model, _, _ = load_job_model(outcome.job_dir)
    with torch.no_grad():
        reloaded = model(input_ids=torch.tensor([[10, 20, 30, 1]]), decoder_input_ids=torch.tensor([[0, 10]])).logits
    assert torch.equal(reloaded, captured["logits"])


def test_lora_adapter_loads_with_plain_peft(tmp_path):
    outcome = run(make_spec("lora", max_steps=3), tmp_path)
    model, _, _ = load_job_model(outcome.job_dir)
    base, _ = build_random_preset("t5-tiny")
    plain = PeftModel.from_pretrained(base, outcome.adapter_path).eval()
    ids = torch.tensor([[10, 20, 30, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids[:, :2]).logits
        got = plain(input_ids=ids, decoder_input_ids=ids[:, :2]).logits
    assert torch.equal(got, expected)


def test_create_job_saves_without_training(tmp_path):
    # a dotted task name is valid; PEFT could not take it as an adapter name as it stands
    outcome = run(make_spec("hybrid", kind="create").model_copy(update={"task": "v1.reverse"}), tmp_path)
    assert outcome.metrics["steps"] == 0 and outcome.metrics["train_loss"] is None
    assert outcome.stats["trainable_params"] == outcome.stats["lora_params"] + outcome.stats["layer_params"]
    assert Path(outcome.adapter_path, "adapter_config.json").exists()


def test_local_model_directory_as_base_model(tmp_path):
    model, tokenizer = build_random_preset("gpt2-tiny")
    directory = save_base_model(model, tokenizer, tmp_path / "my-gpt2")
    spec = make_spec("lora", "gpt2-tiny").model_copy(update={"base_model": str(directory)})
    outcome = run(spec, tmp_path / "art")
    assert outcome.stats["base_params"] == sum(p.numel() for p in model.parameters())


def test_unknown_hub_model_fails_at_once_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = make_spec().model_copy(update={"base_model": "nobody/no-such-model"})
    with pytest.raises(JobError, match=r"base_model: 'nobody/no-such-model' is neither a local directory"):
        run(spec, tmp_path)


def test_cancel_stops_training_and_keeps_a_resumable_checkpoint(tmp_path):
    spec = make_spec("lora", max_steps=12, checkpoint_every=4)
    steps = []

    def should_cancel():
        return len(steps) >= 9

    with pytest.raises(JobCancelled):
        run(spec, tmp_path, on_progress=lambda p: steps.append(p.step), should_cancel=should_cancel,
            progress_interval=0)
    assert not (tmp_path / "batch1" / "job1").exists()  # nothing half-written
    checkpoint = tmp_path / "batch1" / ".job1.checkpoint"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 8

    resumed = run(spec, tmp_path)
    recorded = json.loads((Path(resumed.job_dir) / "job.json").read_text())["metrics"]
    assert recorded["resumed_from_step"] == 8 and resumed.metrics["steps"] == 12
    assert not checkpoint.exists()
    straight = run(spec, tmp_path, job_id="job2")
    # Same data order, same optimizer state: the resumed run ends where an uninterrupted one does.
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-5)
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("rows,message", [
    (None, "does not exist"),
    ('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d"}\n', "lacks the `input` and `target`"),
])
def test_bad_dataset_names_the_key(rows, message, tmp_path):
    dataset = tmp_path / "data.jsonl"
    if rows is not None:
        dataset.write_text(rows)
    with pytest.raises(JobError) as error:
        run(make_spec(dataset=str(dataset)), tmp_path)
    assert "train.dataset" in str(error.value) and message in str(error.value)


def test_encoder_only_train_jobs_default_to_classification():
    assert make_spec("lora", "bert-tiny").train.objective == "classification"


def test_unknown_target_module_fails_the_job_before_anything_is_written(tmp_path):
    spec = make_spec().model_copy(update={"lora": make_spec().lora.model_copy(update={"target_modules": ["qq"]})})
    with pytest.raises(ConfigError, match="lora.target_modules"):
        run(spec, tmp_path)
    assert not (tmp_path / "batch1").exists() or not any((tmp_path / "batch1").iterdir())
