"""Training options: accumulation, clipping, schedules, optimizers, LoRA+, gradient checkpointing,
resume with each; and the BART, Phi-3 and Gemma families training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from jobs.spec import JobSpec, LayerSpec, LoRASpec, TrainSpec
from worker.architectures import architecture_for
from worker.device import DeviceManager
from worker.errors import JobCancelled, JobError
from worker.extensions import ExtensionConfig, HybridExtension, LoRAExtension, TransformerLayerExtension
from worker.models import build_random_preset
from worker.pipeline import JobContext, load_job_model, run_job
from worker.training import Trainer

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
BUILDERS = {"lora": LoRAExtension, "layer": TransformerLayerExtension, "hybrid": HybridExtension}


def trainer_for(extension="lora", preset="t5-tiny", **train) -> Trainer:
    """A set-up Trainer (no eval split) on a freshly built model; LoRA's random init seeded."""
    model, tokenizer = build_random_preset(preset)
    device_manager = DeviceManager("cpu")
    spec = TrainSpec(**{"dataset": str(DATA / "reverse.jsonl"), "max_steps": 10, "batch_size": 4,
                        "eval_fraction": 0.0, "checkpoint_every": 0, **train})
    config = ExtensionConfig(lora=LoRASpec(r=4, dropout=0.0), layer=LayerSpec(init_scale=0.5))
    torch.manual_seed(0)
    built = BUILDERS[extension](model, config, device_manager).build("t")
    trainer = Trainer(built, tokenizer, architecture_for(model).task_type, spec, device_manager)
    trainer.setup()
    return trainer


def gradients(trainer: Trainer, micro_batches) -> tuple[float, list[torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.accumulate(micro_batches)
    return loss, [p.grad.clone() for p in trainer.params]


@pytest.mark.parametrize("preset", ["t5-tiny", "llama-tiny"])
def test_accumulating_two_micro_batches_gives_the_large_batchs_gradient(preset):
    trainer = trainer_for(preset=preset, grad_accum_steps=2)
    examples = trainer.train_set[:8]
    halves = [examples[:4], examples[4:]]
    accumulated_loss, accumulated = gradients(trainer, halves)
    large_loss, large = gradients(trainer, [examples])
    # Summation order differs (two partial sums, each scaled), so equal to fp32 rounding only.
    assert accumulated_loss == pytest.approx(large_loss, rel=1e-6)
    for a, b in zip(accumulated, large):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the micro-batches hold different numbers of target tokens: a plain mean of their two means
    # is another number, which the token weighting avoids
    means = [trainer.accumulate([half]) for half in halves]
    assert abs(sum(means) / 2 - large_loss) > 1e-4


def test_a_step_uses_its_own_micro_batches_in_order():
    trainer = trainer_for(batch_size=2, grad_accum_steps=3)
    assert trainer.micro_batches(1) == [trainer.batches.batch(i) for i in (3, 4, 5)]


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.5, 0.125]),
    ("cosine", [0.5, 1.0, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 7 / 8))]),
])
def test_schedules_after_the_warm_up(schedule, expected):
    trainer = trainer_for(lr_scheduler=schedule, warmup_steps=2, learning_rate=1e-3)
    assert [trainer.lr_factor(step) for step in (0, 1, 2, 6, 9)] == pytest.approx(expected)
    for _ in range(6):
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * expected[3])


@pytest.mark.parametrize("max_grad_norm", [0.01, None])
def test_max_grad_norm_clips_the_gradient_the_optimizer_sees(max_grad_norm):
    trainer = trainer_for(max_grad_norm=max_grad_norm)
    norms = []
    trainer.optimizer.register_step_pre_hook(lambda *_: norms.append(
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params])))))
    trainer._train_step(trainer.micro_batches(0))
    if max_grad_norm:
        assert norms[0] <= max_grad_norm * (1 + 1e-4)
    else:
        assert norms[0] > 0.01


def test_loraplus_trains_the_b_matrices_at_a_higher_learning_rate():
    trainer = trainer_for(loraplus_lr_ratio=16, learning_rate=1e-3)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert rates and all(rate == pytest.approx(16e-3 if "lora_B" in name else 1e-3) for name, rate in rates.items())
    assert {name for name in rates if "lora_B" in name} and {name for name in rates if "lora_A" in name}
    assert len(rates) == len(trainer.params)


@pytest.mark.parametrize("extension,preset", [("lora", "t5-tiny"), ("hybrid", "llama-tiny")])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(extension, preset):
    results = []
    for checkpointing in (False, True):
        trainer = trainer_for(extension, preset, gradient_checkpointing=checkpointing)
        trainer.model.train()
        extended = trainer.model.get_base_model()
        # the attention inside the last block (an added one in the hybrid)
        attention = extended.encoder.block[-1].layer[0] if preset == "t5-tiny" else extended.model.layers[-1].self_attn
        calls: list[int] = []
        attention.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        loss, grads = gradients(trainer, trainer.micro_batches(0))
        results.append((loss, grads, len(calls)))
    (plain_loss, plain, plain_calls), (loss, grads, calls) = results
    assert (plain_calls, calls) == (1, 2)  # the checkpointed block ran again in the backward pass
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def job(extension="lora", preset="t5-tiny", device="cpu", **train) -> JobSpec:
    return JobSpec.model_validate({
        "task": "t", "extension": extension, "base_model": f"random:{preset}", "device": device,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"dataset": str(DATA / "reverse.jsonl"), "max_steps": 2, "batch_size": 4, "checkpoint_every": 0,
                  **train}})


def run(spec, root, job_id="j1", **ctx):
    return run_job(JobContext(job_id=job_id, batch_id="b", spec=spec, artifacts_root=root, **ctx))


@pytest.mark.parametrize("options", [
    {"grad_accum_steps": 2, "lr_scheduler": "cosine", "warmup_steps": 1},
    {"optimizer": "adafactor", "lr_scheduler": "linear", "loraplus_lr_ratio": 4, "gradient_checkpointing": True},
])
def test_resume_ends_where_an_uninterrupted_run_does(options, tmp_path):
    spec = job(max_steps=6, checkpoint_every=2, **options)
    steps = []
    with pytest.raises(JobCancelled):
        run(spec, tmp_path, on_progress=lambda p: steps.append(p.step), should_cancel=lambda: len(steps) >= 5,
            progress_interval=0)
    state = json.loads((tmp_path / "b" / ".j1.checkpoint" / "trainer_state.json").read_text())
    accum = spec.train.grad_accum_steps
    assert (state["step"], state["grad_accum_steps"], state["next_micro_batch"]) == (4, accum, 4 * accum)
    assert state["scheduler"]["last_epoch"] == 4
    resumed = run(spec, tmp_path)
    straight = run(spec, tmp_path, job_id="j2")
    recorded = json.loads((Path(resumed.job_dir) / "job.json").read_text())["metrics"]
    assert recorded["resumed_from_step"] == 4 and recorded["effective_batch_size"] == 4 * accum
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-5)
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], rel=1e-5)


def test_a_checkpoint_with_another_accumulation_is_refused(tmp_path):
    spec = job(max_steps=4, checkpoint_every=2, grad_accum_steps=2)
    steps = []
    with pytest.raises(JobCancelled):
        run(spec, tmp_path, on_progress=lambda p: steps.append(p.step), should_cancel=lambda: len(steps) >= 3,
            progress_interval=0)
    changed = job(max_steps=4, checkpoint_every=2, grad_accum_steps=1)
    with pytest.raises(JobError, match="grad_accum_steps=2"):
        run(changed, tmp_path)


def test_adamw_8bit_needs_cuda():
    with pytest.raises(ValidationError, match="adamw_8bit needs CUDA"):
        job(optimizer="adamw_8bit")
    assert job(device="auto", optimizer="adamw_8bit").queue_kind == "any"
    # an auto job that lands on a CPU worker fails clearly, never with another optimizer
    with pytest.raises(JobError, match="adamw_8bit needs CUDA .* runs on cpu"):
        trainer_for(optimizer="adamw_8bit")


def test_loraplus_is_refused_for_a_job_without_lora():
    with pytest.raises(ValidationError, match="loraplus_lr_ratio: LoRA\\+ sets the learning rate of LoRA B"):
        job("layer", loraplus_lr_ratio=16)
    assert job("hybrid", loraplus_lr_ratio=16).train.loraplus_lr_ratio == 16


@pytest.mark.parametrize("preset", ["bart-tiny", "phi3-tiny", "gemma-tiny"])
@pytest.mark.parametrize("extension", ["lora", "layer"])
def test_new_families_train_save_and_reload(preset, extension, tmp_path):
    outcome = run(job(extension, preset, max_steps=3, learning_rate=3e-3), tmp_path)
    losses = [loss for _, split, loss in outcome.loss_curve if split == "train"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert outcome.stats[f"{extension}_params"] > 0
    model, _, _ = load_job_model(outcome.job_dir)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[-1] > 1
