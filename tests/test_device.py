"""Device and dtype policy: CPU checks always, CUDA checks where a GPU exists (skipped otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.spec import JobSpec
from worker.device import DeviceManager, get_device, get_dtype
from worker.errors import DeviceError
from worker.pipeline import JobContext, run_job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_auto_resolves_to_a_working_device():
    device = get_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert device.type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_names_the_setting_and_the_fix():
    with pytest.raises(DeviceError, match=r"device: 'cuda:0' was asked for but CUDA is not available.*device: auto"):
        get_device("cuda:0")


def test_cpu_policy_is_fp32_everywhere(tmp_path):
    assert get_dtype(torch.device("cpu")) == torch.float32
    spec = JobSpec(task="t", extension="hybrid", base_model="random:t5-tiny", device="cpu",
                   train={"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 2})
    outcome = run_job(JobContext(job_id="j", batch_id="b", spec=spec, artifacts_root=tmp_path))
    assert (outcome.device, outcome.dtype) == ("cpu", "float32")
    assert outcome.metrics["peak_memory_mb"] > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("extension", ["lora", "layer", "hybrid"])
def test_cuda_policy_low_precision_base_fp32_trainable_and_training_works(extension, tmp_path):
    manager = DeviceManager("cuda", family="t5")
    # is_bf16_supported() is True on T4/V100, where bf16 is emulated: capability 8.0 is the line;
    # below it a T5 base stays float32 (it overflows in float16)
    expected = torch.bfloat16 if torch.cuda.get_device_capability(manager.device) >= (8, 0) else torch.float32
    assert manager.base_dtype == expected
    from worker.extensions import ExtensionConfig, extension_class
    from worker.models import load_base_model

    base = load_base_model("random:t5-tiny", manager)
    model = extension_class(extension)(base.model, ExtensionConfig(), manager).build("t")
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {expected}
    assert {p.device.type for p in model.parameters()} == {"cuda"}

    spec = JobSpec(task="t", extension=extension, base_model="random:t5-tiny", device="cuda",
                   train={"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": 30, "learning_rate": 3e-3})
    outcome = run_job(JobContext(job_id="j", batch_id="b", spec=spec, artifacts_root=tmp_path))
    assert outcome.device.startswith("cuda") and outcome.dtype == str(expected).removeprefix("torch.")
    [initial_eval_loss] = [loss for step, split, loss in outcome.loss_curve if (step, split) == (0, "eval")]
    assert outcome.metrics["eval_loss"] < initial_eval_loss
    assert outcome.metrics["peak_memory_mb"] > 0
    before = torch.cuda.memory_allocated()
    manager.release()
    assert torch.cuda.memory_allocated() <= before


def _touched_buffer(megabytes: int) -> bytearray:
    buffer = bytearray(megabytes * 2**20)
    for offset in range(0, len(buffer), 4096):  # make every page resident
        buffer[offset] = 1
    return buffer


def test_cpu_peak_memory_covers_a_peak_that_was_gone_before_the_job_ended():
    manager = DeviceManager("cpu")
    manager.reset_peak_memory()
    before = manager.peak_memory_mb()
    buffer = _touched_buffer(200)
    del buffer  # a peak inside a step: nothing samples it between steps
    assert manager.peak_memory_mb() >= before + 150
    # the next job starts from its own peak, not the process's lifetime peak
    manager.reset_peak_memory()
    if Path("/proc/self/clear_refs").exists():  # Linux keeps the peak (VmHWM); elsewhere it is sampled
        assert manager.peak_memory_mb() < before + 100
