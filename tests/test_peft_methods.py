"""PEFT methods through PEFT: each kind counts what PEFT counts, saves what plain PEFT loads, and
the LoRA variants, AdaLoRA's schedule and QLoRA's refusals do what they say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError

from jobs.errors import describe_validation_error
from jobs.extensions import EXTENSION_KINDS
from jobs.spec import JobSpec
from worker.device import DeviceManager
from worker.errors import JobError
from worker.extensions import ExtensionConfig, extension_class
from worker.extensions.layer import apply_saved_layer
from worker.extensions.lora import adapter_name_for
from worker.models import build_random_preset, structural_copy
from worker.pipeline import JobContext, run_job

# kind, its section's settings (besides the defaults), the presets it runs on
KINDS = [
    ("lora", {"lora": {"variant": "dora"}}),
    ("lora", {"lora": {"variant": "rslora"}}),
    ("lora", {"lora": {"init": "gaussian"}}),
    ("lora", {"lora": {"init": "pissa"}}),
    ("lora", {"lora": {"init": "olora"}}),
    ("adalora", {}),
    ("ia3", {}),
    ("loha", {}),
    ("lokr", {"lokr": {"r": 4}}),
    ("hybrid-ia3", {}),
    ("hybrid-loha", {}),
    ("hybrid-lokr", {}),
]
KIND_IDS = [f"{kind}-{next(iter(next(iter(extra.values())).values()), '')}" if extra else kind
            for kind, extra in KINDS]
BASES = ["t5-tiny", "llama-tiny"]


def job_spec(extension: str, base: str = "t5-tiny", **sections) -> JobSpec:
    return JobSpec(task="t.1", kind="create", extension=extension, base_model=f"random:{base}", device="cpu",
                   **sections)


def build(spec: JobSpec):
    base, _ = build_random_preset(spec.base_model.removeprefix("random:"))
    extension = extension_class(spec.extension)(base, ExtensionConfig.from_job_spec(spec))
    return base, extension, extension.build(spec.task)


def inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.arange(3, 11).reshape(1, 8)
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("kind,sections", KINDS, ids=KIND_IDS)
def test_statistics_equal_peft_count_and_plain_peft_reloads_the_adapter(kind, sections, base, tmp_path):
    spec = job_spec(kind, base, **sections)
    base_model, extension, model = build(spec)
    stats = extension.statistics(spec.task)
    assert stats.trainable_params == model.get_nb_trainable_parameters()[0]
    if "layer" not in EXTENSION_KINDS[kind].sections:
        assert stats.lora_params == stats.trainable_params and stats.layer_params == 0
    else:
        assert 0 < stats.lora_params < stats.trainable_params == stats.lora_params + stats.layer_params
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: an untouched adapter is a no-op and would hide a bad reload
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    expected = model(**inputs(model)).logits
    extension.save(spec.task, tmp_path)

    plain = structural_copy(base_model)
    if (tmp_path / "layer").is_dir():
        apply_saved_layer(plain, tmp_path / "layer")
    reloaded = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(reloaded(**inputs(reloaded)).logits, expected, rtol=1e-4, atol=1e-5)


def test_dora_trains_a_magnitude_per_output_feature_and_rslora_scales_by_the_root_of_r():
    _, _, dora = build(job_spec("lora", lora={"variant": "dora", "r": 4}))
    magnitudes = [name for name, _ in dora.named_parameters() if "lora_magnitude_vector" in name]
    assert magnitudes and all(p.requires_grad for n, p in dora.named_parameters() if n in magnitudes)
    _, _, plain = build(job_spec("lora", lora={"r": 4}))
    assert not any("lora_magnitude_vector" in name for name, _ in plain.named_parameters())

    _, _, rslora = build(job_spec("lora", lora={"variant": "rslora", "r": 4, "alpha": 16}))
    q = rslora.base_model.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.scaling[adapter_name_for("t.1")] == pytest.approx(16 / math.sqrt(4))
    q = plain.base_model.model.encoder.block[0].layer[0].SelfAttention.q
    assert q.scaling[adapter_name_for("t.1")] == pytest.approx(16 / 4)


def test_pissa_moves_the_principal_part_into_the_adapter_and_leaves_the_shared_base_alone():
    base, _, model = build(job_spec("lora", lora={"init": "pissa", "r": 4}))
    base.eval(), model.eval()
    original = base.encoder.block[0].layer[0].SelfAttention.q.weight.detach().clone()
    before = base(**inputs(base)).logits
    q = model.base_model.model.encoder.block[0].layer[0].SelfAttention.q
    assert not torch.equal(q.base_layer.weight, original)  # the residual
    assert torch.equal(base.encoder.block[0].layer[0].SelfAttention.q.weight, original)  # the cached base: untouched
    torch.testing.assert_close(model(**inputs(model)).logits, before, rtol=1e-4, atol=1e-5)  # same function at start


def test_adalora_reallocates_its_rank_budget_through_the_trainer_hook(dataset, tmp_path):
    spec = JobSpec(task="t", extension="adalora", base_model="random:t5-tiny", device="cpu",
                   adalora={"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1},
                   train={"dataset": str(dataset), "max_steps": 4, "batch_size": 4, "eval_fraction": 0,
                          "checkpoint_every": 0})
    assert spec.adalora.total_step == 4  # train.max_steps
    outcome = run_job(JobContext(job_id="j1", batch_id="b1", spec=spec, artifacts_root=tmp_path))
    saved = json.loads(Path(outcome.adapter_path, "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 4
    ranks = saved["rank_pattern"]  # written by update_and_allocate: the budget was allocated
    assert ranks and sum(sum(mask) for mask in ranks.values()) <= 2 * len(ranks) < 4 * len(ranks)


def test_max_steps_squeezes_the_adalora_schedule_into_the_capped_steps():
    from jobs.batch import Batch
    from jobs.cli import _with_max_steps

    spec = JobSpec(task="t", extension="adalora", base_model="random:t5-tiny",
                   adalora={"init_r": 4, "target_r": 2, "tinit": 200, "tfinal": 300},
                   train={"dataset": "d.jsonl", "max_steps": 1000})
    assert spec.adalora.total_step == 1000
    batch = Batch(name="b", base_model=None, jobs=[spec], source=Path("b.yaml"))
    capped = _with_max_steps(batch, 10).jobs[0]
    assert capped.train.max_steps == 10
    assert (capped.adalora.total_step, capped.adalora.tinit, capped.adalora.tfinal) == (10, 2, 3)
    tiny = _with_max_steps(batch, 1).jobs[0].adalora  # no room for warm-up or final steps
    assert (tiny.total_step, tiny.tinit, tiny.tfinal) == (1, 0, 0)
    assert _with_max_steps(batch, 5000).jobs[0].adalora.total_step == 1000  # not capped: unchanged


# ---- validation: every kind validates, unknown keys and bad settings are refused -----------------

def problems(**job) -> list[str]:
    with pytest.raises(ValidationError) as error:
        JobSpec(**{"task": "x", "base_model": "random:t5-tiny", "kind": "create", **job})
    return describe_validation_error(error.value, "job 1 (x)")


def test_each_kind_validates_with_its_own_section_and_drops_the_others():
    for kind in ("adalora", "ia3", "loha", "lokr", "hybrid-ia3", "hybrid-loha", "hybrid-lokr"):
        method = kind.removeprefix("hybrid-")
        spec = JobSpec(task="x", base_model="random:t5-tiny", kind="create", extension=kind, lora={"r": 4},
                       ia3={}, loha={"r": 2})
        assert getattr(spec, method) is not None and spec.lora is None
        assert (spec.layer is not None) == kind.startswith("hybrid-")
        assert spec.ia3 is None or method == "ia3"


@pytest.mark.parametrize("job,key,fix", [
    ({"extension": "ia3", "ia3": {"r": 4}}, "ia3.r", "allowed keys: target_modules"),
    ({"extension": "loha", "loha": {"dropout": 0.1}}, "loha.dropout", "rank_dropout"),
    ({"extension": "lokr", "lokr": {"rank": 4}}, "lokr.rank", "unknown key"),
    ({"extension": "adalora", "adalora": {"r": 8}}, "adalora.r", "unknown key"),
    ({"extension": "adalora", "adalora": {"init_r": 4, "target_r": 8}}, "adalora", "lower target_r"),
    ({"extension": "ia3", "ia3": {"target_modules": ["k"], "feedforward_modules": ["wo"]}}, "ia3", "also be a target"),
    ({"extension": "lora", "lora": {"variant": "vera"}}, "lora.variant", "'dora'"),
    ({"extension": "lora", "lora": {"init": "loftq"}}, "lora.init", "'pissa'"),
    ({"extension": "hybrid", "lora": {"init": "pissa"}}, "(job)", "use it in lora jobs"),
    ({"extension": "adalora", "kind": "train", "train": {"dataset": "d.jsonl", "epochs": 1}},
     "(job)", "set train.max_steps"),
    ({"extension": "adalora", "kind": "train", "adalora": {"tinit": 5, "tfinal": 5},
      "train": {"dataset": "d.jsonl", "max_steps": 10}}, "(job)", "raise train.max_steps"),
])
def test_bad_method_settings_name_the_key_and_the_fix(job, key, fix):
    lines = problems(**job)
    assert any(f"key `{key}`" in line and fix in line for line in lines), lines


# ---- QLoRA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_quantize_on_a_cpu_or_mps_job_is_refused_at_validation(device):
    lines = problems(extension="lora", quantize="4bit", device=device)
    assert any("key `quantize`" in line and f"device: {device}" in line and "device: cuda" in line
               for line in lines), lines
    assert all(line.startswith("job 1 (x): ") for line in lines)


@pytest.mark.parametrize("extension", ["layer", "hybrid", "hybrid-ia3"])
def test_quantize_with_an_added_block_is_refused(extension):
    lines = problems(extension=extension, quantize="8bit")
    assert any("key `quantize`" in line and "adapter kind" in line for line in lines), lines


def test_quantize_routes_the_job_to_a_gpu_and_pissa_is_refused_with_it():
    assert JobSpec(task="x", kind="create", extension="ia3", base_model="random:t5-tiny",
                   quantize="4bit").queue_kind == "gpu"
    lines = problems(extension="lora", quantize="4bit", lora={"init": "pissa"})
    assert any("lora.init: pissa" in line and "quantize" in line for line in lines), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_auto_job_with_quantize_on_a_cpu_worker_fails_clearly_and_is_not_run_unquantised(tmp_path):
    spec = JobSpec(task="t", kind="create", extension="lora", base_model="random:t5-tiny", quantize="4bit")
    with pytest.raises(JobError, match=r"quantize: 4bit needs a CUDA GPU .*\(device: auto\); set device: cuda"):
        run_job(JobContext(job_id="j1", batch_id="b1", spec=spec, artifacts_root=tmp_path))
    assert not any(tmp_path.rglob("adapter_config.json"))


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.skipif(not _has_bitsandbytes(), reason="bitsandbytes is not installed (pip install 'graftq[qlora]')")
def test_a_4bit_qlora_job_trains_on_cuda(dataset, tmp_path):
    import bitsandbytes as bnb

    from worker.models import BASE_MODELS

    spec = JobSpec(task="t", extension="lora", base_model="random:llama-tiny", device="cuda", quantize="4bit",
                   train={"dataset": str(dataset), "max_steps": 3, "batch_size": 4, "checkpoint_every": 0})
    outcome = run_job(JobContext(job_id="j1", batch_id="b1", spec=spec, artifacts_root=tmp_path))
    assert outcome.metrics["steps"] == 3 and math.isfinite(outcome.metrics["train_loss"])
    assert outcome.stats["trainable_params"] == outcome.stats["lora_params"] > 0
    base, cached = BASE_MODELS.get("random:llama-tiny", DeviceManager("cuda", family="llama"), "4bit")
    assert cached and any(isinstance(m, bnb.nn.Linear4bit) for m in base.model.modules())


def test_the_methods_example_compares_lora_dora_ia3_and_a_two_block_expansion():
    from jobs.batch import load_batch

    batch = load_batch(Path(__file__).resolve().parent.parent / "examples" / "methods.yaml")
    kinds = {(job.extension, job.lora.variant if job.lora else None) for job in batch.jobs}
    assert kinds == {("lora", "lora"), ("lora", "dora"), ("ia3", None), ("layer", None)}
    assert all(job.layer.positions == [1, 2] for job in batch.jobs if job.extension == "layer")
    assert len(batch.jobs) == 12
