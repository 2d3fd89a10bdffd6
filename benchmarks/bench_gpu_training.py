"""GPU training: a graftq `train` job on random:flan-t5-small with the bf16 policy, and how much
of the GPU's peak its training step reaches.

What is measured, on a CUDA device:
- a whole graftq train job through `worker.pipeline.run_job` (LoRA on q,k,v,o, the default
  dtype policy: frozen base weights in bf16, trainable parameters in fp32, bf16 autocast):
  tokens/second and steps/second of its training loop (`metrics`);
- the floating-point work of one training step (forward + backward) of the very model graftq
  builds for that job, counted by `torch.utils.flop_counter.FlopCounterMode` over the job's
  own batches; achieved FLOP/s = FLOPs per step x steps/second, and the fraction of the GPU's
  dense bf16 tensor-core peak (datasheet figure by device name, or GRAFTQ_GPU_PEAK_TFLOPS);
- what limits it: a `torch.profiler` trace of a few steps gives the share of wall time the GPU
  spends in kernels at all (low = the step waits on Python and kernel launches, not on the
  GPU) and the share of kernel time in matrix multiplies, with the top kernels.

Without a CUDA device the script says so and exits 0 (`run_all.py` runs it only where
`nvidia-smi -L` lists a GPU). `--device cpu` runs the same measurement on the CPU with
random:t5-tiny and a few steps (fp32, no peak): a smoke run of the counting and profiling code.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from _common import EXAMPLES, Check, Result, collated_batches, main

NAME = "gpu_training"
PRESET = "random:flan-t5-small"
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q", "k", "v", "o"]}
TRAIN = {"dataset": str(EXAMPLES / "reverse.jsonl"), "batch_size": 32, "learning_rate": 1e-3, "max_length": 64,
         "eval_fraction": 0.1, "seed": 0, "checkpoint_every": 0}
#: The CPU smoke run only checks that the counting and profiling code runs: a tiny model, small batches.
SMOKE_PRESET = "random:t5-tiny"
SMOKE_TRAIN = {**TRAIN, "batch_size": 8, "max_length": 32}

#: Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by the words of
#: the device name (`NVIDIA H100 80GB HBM3` is the SXM part); most specific entries first.
PEAK_BF16_TFLOPS = {
    "GH200": 989.4, "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak for `device_name` (GRAFTQ_GPU_PEAK_TFLOPS wins), or None if unknown."""
    if os.environ.get("GRAFTQ_GPU_PEAK_TFLOPS"):
        return float(os.environ["GRAFTQ_GPU_PEAK_TFLOPS"])
    for fragment, value in PEAK_BF16_TFLOPS.items():
        # whole words only: "L4" is not the L40, "H200" not the GH200
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(fragment)}(?![A-Za-z0-9])", device_name):
            return value
    return None


def job_spec(device: str, steps: int):
    from jobs.spec import JobSpec

    preset, train = (SMOKE_PRESET, SMOKE_TRAIN) if device == "cpu" else (PRESET, TRAIN)
    return JobSpec(task="reverse", kind="train", extension="lora", base_model=preset, device=device, lora=LORA,
                   train={**train, "max_steps": steps})


def graftq_job(device: str, steps: int, root: Path, job_id: str) -> dict:
    """One graftq train job; its metrics, device and dtype."""
    from worker.pipeline import JobContext, run_job

    outcome = run_job(JobContext(job_id=job_id, batch_id="bench-gpu", spec=job_spec(device, steps),
                                 artifacts_root=root))
    return {**outcome.metrics, "device": outcome.device, "dtype": outcome.dtype}


def built_model_and_batches(device: str, steps: int):
    """The model graftq builds for the job (same classes, same policy) and the job's batches."""
    from worker.device import DeviceManager
    from worker.extensions import ExtensionConfig, extension_class
    from worker.models import BASE_MODELS

    spec = job_spec(device, steps)
    device_manager = DeviceManager(spec.device)
    base, _ = BASE_MODELS.get(spec.base_model, device_manager)
    extension = extension_class(spec.extension)(base.model, ExtensionConfig.from_job_spec(spec), device_manager)
    model = extension.build(spec.task)
    train = spec.train.model_dump()
    batches = [{key: value.to(device_manager.device) for key, value in batch.items()}
               for batch in collated_batches(train, steps, base.tokenizer, base.arch.task_type)]
    return model, batches, device_manager


def train_step(model, batch, optimizer, device_manager) -> None:
    with device_manager.autocast():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flops_per_step(model, batches, device_manager) -> float:
    """Mean forward + backward FLOPs of a training step over `batches` (shapes vary with padding)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            with device_manager.autocast():
                loss = model(**batch).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        counts.append(counter.get_total_flops())
    return statistics.mean(counts)


def kernel_time_shares(events, wall: float) -> dict:
    """How busy the GPU was over `wall` seconds, and on what, from profiler events.

    Only CUDA-type events count (kernels, memcpy, memset): a CPU op also carries the device
    time of the kernels it launched, and a user annotation spans them, so counting those too
    would count each kernel twice or more.
    """
    from torch.autograd import DeviceType

    def device_time(event) -> float:  # microseconds; named self_cuda_time_total before torch 2.4
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               and device_time(e) > 0]
    kernel_seconds = sum(device_time(e) for e in kernels) / 1e6
    matmul = sum(device_time(e) for e in kernels
                 if any(word in e.key.lower() for word in ("gemm", "matmul", "cutlass", "sm90", "xmma"))) / 1e6
    top = sorted(kernels, key=device_time, reverse=True)[:5]
    return {
        "gpu_busy_fraction (kernel time / wall)": kernel_seconds / wall,
        "matmul_share_of_kernel_time": matmul / kernel_seconds if kernel_seconds else 0.0,
        "top_kernels (name, share of kernel time)": [(e.key[:80], round(device_time(e) / 1e6 / kernel_seconds, 3))
                                                     for e in top],
    }


def profile_steps(model, batches, device_manager, warmup: int) -> dict:
    """Kernel-time shares over `batches`' steps, after `warmup` steps: how busy the device is, and on what."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device_manager.device.type == "cuda"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=TRAIN["learning_rate"])
    for batch in batches[:warmup]:  # outside the trace
        train_step(model, batch, optimizer, device_manager)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as trace:
        started = time.perf_counter()
        for batch in batches:
            train_step(model, batch, optimizer, device_manager)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    averages = trace.key_averages()
    figures = {"profiled_steps": len(batches), "profiled_wall_s": wall}
    if cuda:
        return {**figures, **kernel_time_shares(averages, wall)}
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return {**figures, "top_cpu_ops (name, share of wall)": [(e.key, round(e.self_cpu_time_total / 1e6 / wall, 3))
                                                            for e in top]}


def run_on(device: str, quick: bool) -> Result:
    import torch

    on_cpu = device == "cpu"
    # A CPU run only checks that the counting and profiling work: no warm-up job, a few steps.
    steps = 3 if on_cpu else 50 if quick else 200
    spec = job_spec(device, steps)
    result = Result(NAME, f"a {steps}-step LoRA train job on {spec.base_model} (batch {spec.train.batch_size}, "
                          f"max_length {spec.train.max_length}) on {device}, dtype policy as documented")
    with tempfile.TemporaryDirectory(prefix="graftq-bench-gpu-") as tmp:
        root = Path(tmp)
        if not on_cpu:
            graftq_job(device, 10, root, "warmup")  # imports, kernels, the cached base model
        metrics = graftq_job(device, steps, root, "measured")
    model, batches, device_manager = built_model_and_batches(device, 3 if on_cpu else 20)
    flops = flops_per_step(model, batches, device_manager)
    steps_per_second = metrics["steps"] / metrics["train_seconds"]
    achieved = flops * steps_per_second
    name = torch.cuda.get_device_name(device_manager.device) if device_manager.device.type == "cuda" else "cpu"
    peak = peak_tflops(name) if device_manager.device.type == "cuda" else None
    result.figures.update({
        "device": f"{metrics['device']} ({name})", "dtype (frozen base weights)": metrics["dtype"],
        "torch": torch.__version__, "tokens_per_second": metrics["tokens_per_second"],
        "steps_per_second": steps_per_second, "train_seconds": metrics["train_seconds"],
        "peak_memory_mb": metrics["peak_memory_mb"], "gflops_per_step (fwd+bwd)": flops / 1e9,
        "achieved_tflops": achieved / 1e12,
    })
    if peak is not None:
        result.figures["peak_bf16_tflops (datasheet, dense)"] = peak
        result.figures["fraction_of_peak"] = achieved / (peak * 1e12)
    result.figures.update(profile_steps(model, batches[:10], device_manager, warmup=1 if on_cpu else 3))
    # Worked out here from the capability, not with the policy's own function, so that the check can fail.
    if device_manager.device.type != "cuda":
        expected = "float32"
    elif torch.cuda.get_device_capability(device_manager.device) >= (8, 0):
        expected = "bfloat16"
    else:
        expected = "float32"  # flan-t5 is a T5: kept in fp32 where bf16 is not native
    result.checks.append(Check(
        "frozen base weights in the documented dtype for this device", value=float(metrics["dtype"] == expected),
        unit=f"(1 = {expected})", target=f"dtype {expected}", passed=metrics["dtype"] == expected))
    busy = result.figures.get("gpu_busy_fraction (kernel time / wall)")
    if busy is not None:
        result.notes.append(
            "the GPU is busy for less than half of each step: a model this small is bound by Python and "
            "kernel launches, not by the tensor cores" if busy < 0.5 else
            "the GPU is busy for most of each step: the kernels themselves bound it (see the top kernels)")
    return result


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="cuda")
    known, rest = parser.parse_known_args()
    if known.device.startswith("cuda") and not cuda_available():
        print(f"{NAME}: no CUDA device here; nothing measured (use --device cpu for a smoke run)")
        raise SystemExit(0)
    raise SystemExit(main(NAME, lambda quick: run_on(known.device, quick), rest))
