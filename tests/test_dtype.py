"""The dtype policy and low-precision jobs, proven on the CPU (bf16 and fp16 autocast run there too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import worker.device
from jobs.spec import JobSpec
from worker.device import DTYPES, DeviceManager, get_dtype
from worker.errors import JobCancelled
from worker.models import build_random_preset, load_base_model, save_base_model
from worker.pipeline import JobContext, load_job_model, run_job
from worker.training import Trainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
T4, V100, A100, H100 = (7, 5), (7, 0), (8, 0), (9, 0)


@pytest.mark.parametrize("capability,family,expected", [
    (T4, "llama", torch.float16), (V100, "gpt2", torch.float16),
    (A100, "llama", torch.bfloat16), (H100, "gpt2", torch.bfloat16),
    (T4, "t5", torch.float32), (V100, "t5", torch.float32), (A100, "t5", torch.bfloat16), (H100, "t5", torch.bfloat16),
])
def test_auto_dtype_follows_the_job_devices_compute_capability(capability, family, expected, monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # what a T4 says
    assert get_dtype(torch.device("cuda", 1), family) == expected
    assert asked == [torch.device("cuda", 1)]  # the job's GPU, not the current one
    assert get_dtype(torch.device("cpu"), family) == torch.float32


@pytest.mark.parametrize("preset,dtype,kept_fp32", [
    ("llama-tiny", "bfloat16", "rotary_emb.inv_freq"),  # a buffer: rotary angles stay exact
    ("t5-tiny", "float16", "DenseReluDense.wo.weight"),  # transformers keeps these fp32 for fp16
])
def test_a_saved_base_loads_in_the_base_dtype_keeping_what_must_stay_fp32(preset, dtype, kept_fp32, tmp_path):
    model, tokenizer = build_random_preset(preset)
    directory = save_base_model(model, tokenizer, tmp_path / preset)
    base = load_base_model(str(directory), DeviceManager("cpu", dtype))
    tensors = dict(base.model.named_parameters()) | dict(base.model.named_buffers())
    assert {t.dtype for name, t in tensors.items() if name.endswith(kept_fp32)} == {torch.float32}
    assert {t.dtype for name, t in tensors.items() if name.endswith("weight") and not name.endswith(kept_fp32)} == {
        DTYPES[dtype]}


def _safetensors_dtypes(directory: Path) -> set[torch.dtype]:
    dtypes = set()
    for file in directory.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            dtypes |= {handle.get_tensor(key).dtype for key in handle.keys()}
    return dtypes


# Every family and every extension kind in both low-precision dtypes, in nine short jobs.
@pytest.mark.parametrize("preset,extension,dtype", [
    ("t5-tiny", "lora", "bfloat16"), ("t5-tiny", "layer", "float16"), ("t5-tiny", "hybrid", "bfloat16"),
    ("gpt2-tiny", "lora", "float16"), ("gpt2-tiny", "layer", "bfloat16"), ("gpt2-tiny", "hybrid", "float16"),
    ("llama-tiny", "lora", "float16"), ("llama-tiny", "layer", "bfloat16"), ("llama-tiny", "hybrid", "float16"),
])
def test_low_precision_job_checkpoints_resumes_saves_and_reloads(preset, extension, dtype, tmp_path, monkeypatch,
                                                                 caplog):
    low = DTYPES[dtype]
    seen = []
    train = Trainer.train

    def spy(self):  # what the trainer holds once set up (and resumed)
        model = self.model
        seen.append({"frozen": {p.dtype for p in model.parameters() if not p.requires_grad},
                     "trainable": {p.dtype for p in model.parameters() if p.requires_grad},
                     "buffers": {b.dtype for b in model.buffers() if b.is_floating_point()},
                     "scale": self.scaler.get_scale() if self.scaler.is_enabled() else None})
        return train(self)

    monkeypatch.setattr(Trainer, "train", spy)
    spec = JobSpec(task="t", extension=extension, base_model=f"random:{preset}", device="cpu", dtype=dtype,
                   lora={"r": 4}, train={"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 2,
                                         "batch_size": 4, "eval_fraction": 0.05, "eval_batch_size": 32,
                                         "checkpoint_every": 1})
    steps = []
    with pytest.raises(JobCancelled):  # after step 1, with its checkpoint written
        run_job(JobContext(job_id="j", batch_id="b", spec=spec, artifacts_root=tmp_path, progress_interval=0,
                           on_progress=lambda progress: steps.append(progress.step),
                           should_cancel=lambda: bool(steps) and steps[-1] >= 1))
    checkpoint = tmp_path / "b" / ".j.checkpoint"
    assert _safetensors_dtypes(checkpoint) == {torch.float32}  # trainable weights and AdamW state
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert bool(state["scaler"]) == (dtype == "float16")
    if state["scaler"]:
        state["scaler"]["scale"] = 1024.0  # a scale the resumed job must carry on with
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    outcome = run_job(JobContext(job_id="j", batch_id="b", spec=spec, artifacts_root=tmp_path))
    assert outcome.dtype == dtype
    assert json.loads((Path(outcome.job_dir) / "job.json").read_text())["metrics"]["resumed_from_step"] == 1
    for held in seen:
        assert held["frozen"] == {low} and held["trainable"] == {torch.float32}
        assert held["buffers"] <= {torch.float32}  # LLaMA's rotary inv_freq stays fp32
    assert seen[1]["scale"] == (1024.0 if dtype == "float16" else None)
    assert _safetensors_dtypes(Path(outcome.job_dir)) == {torch.float32}
    if preset == "t5-tiny" and dtype == "float16":  # honoured as asked, with a warning
        assert "dtype: float16 on a t5 base as asked" in caplog.text

    # Reloaded on a bf16 base, the model runs forward and generate without autocast.
    model, tokenizer, _ = load_job_model(outcome.job_dir, dtype="bfloat16")
    assert {p.dtype for name, p in model.named_parameters() if "lora_" not in name} == {torch.bfloat16}
    ids = torch.tensor([tokenizer.encode("hello") + [1]])
    with torch.no_grad():
        decoder = {"decoder_input_ids": ids[:, :2]} if preset == "t5-tiny" else {}
        assert torch.isfinite(model(input_ids=ids, **decoder).logits).all()
        assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[-1] > 0


def test_mps_peak_memory_is_the_highest_sample_not_what_is_left_after_cleanup(monkeypatch):
    monkeypatch.setattr(worker.device, "get_device", lambda requested: torch.device("mps"))  # no MPS here
    allocated = [100 * 2**20]
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: allocated[0])
    manager = DeviceManager("mps")
    manager.reset_peak_memory()
    allocated[0] = 300 * 2**20
    manager.sample_memory()  # between training steps
    allocated[0] = 40 * 2**20
    assert manager.peak_memory_mb() == 300
