"""Device and dtype policy.

One documented policy (DESIGN.md "Devices"):
- frozen base weights: bf16 on CUDA devices that support it, fp16 on older CUDA, fp32 on MPS/CPU;
- trainable parameters (LoRA adapters, the added block): always fp32;
- on CUDA the forward pass runs under autocast in the base dtype, so fp32 trainable modules
  and low-precision frozen ones mix without casts in model code.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random

import torch

from worker.errors import DeviceError, is_sticky_cuda_error

_DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"


def get_device(requested: str = "auto") -> torch.device:
    """Resolve `requested` to a working torch.device; raise DeviceError naming the `device` key."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device: {requested!r} was asked for but CUDA is not available on this worker; "
                              "use device: auto or cpu, or run the job on a GPU worker")
        index = int(requested.split(":", 1)[1]) if ":" in requested else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device: {requested!r} does not exist; this worker sees "
                              f"{torch.cuda.device_count()} CUDA device(s) (CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); a graftq worker owns one "
                              "GPU: use device: cuda, and choose GPUs with `graftq worker --gpus`")
        device = torch.device("cuda", index)
    elif requested == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceError("device: 'mps' was asked for but MPS is not available; use auto or cpu")
        device = torch.device("mps")
    elif requested == "cpu":
        device = torch.device("cpu")
    else:
        raise DeviceError(f"device: unknown device {requested!r}; {_DEVICE_HELP}")
    _probe(device)
    return device


def _probe(device: torch.device) -> None:
    """Run a tiny matmul so that a broken device fails here, with the setting named.

    A sticky CUDA error is raised as it is, not as a DeviceError: the process's CUDA context is
    broken, not the job's setting, and the task replaces the worker process on such an error.
    """
    try:
        x = torch.ones(8, 8, device=device)
        float((x @ x).sum().item())
    except Exception as error:  # a broken driver raises anything from RuntimeError to AcceleratorError
        if is_sticky_cuda_error(error):
            raise
        raise DeviceError(f"device: {device} does not work ({error}); use another device") from error


def check_gpu_worker() -> str | None:
    """The start-up self-check of a GPU worker process: None when it owns exactly one working
    CUDA device, otherwise what is wrong and the fix."""
    visible = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"CUDA is not available ({visible}; torch {torch.__version__}, {build}): install a CUDA "
                "build of torch (make install TORCH_SPEC=torch) and check the driver with nvidia-smi, "
                "or serve on the CPU with graftq worker --gpus none")
    if torch.cuda.device_count() != 1:
        return (f"this process sees {torch.cuda.device_count()} CUDA devices ({visible}); a GPU worker owns "
                "exactly one: unset CUDA_VISIBLE_DEVICES in the worker's environment and choose GPUs "
                "with graftq worker --gpus")
    try:
        _probe(torch.device("cuda", 0))
    except Exception as error:  # DeviceError or a sticky CUDA error: either way the GPU cannot run jobs
        return f"a test computation on the GPU failed ({error}); check the GPU with nvidia-smi"
    return None


def get_dtype(device: torch.device) -> torch.dtype:
    """The dtype of frozen base weights on `device` (see the module docstring)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DeviceManager:
    """Resolves the device once and applies the dtype policy, seeding and memory measurement."""

    def __init__(self, device: str = "auto"):
        self.requested = device
        self.device = get_device(device)
        self.base_dtype = get_dtype(self.device)
        self.trainable_dtype = torch.float32
        self._rss_peak = 0
        #: the kernel keeps this job's peak RSS (Linux: VmHWM, reset per job); no sampling needed
        self._kernel_peak = False

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.base_dtype)

    def place_base(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a frozen base model to the device in the base dtype."""
        return model.to(device=self.device, dtype=self.base_dtype)

    def place_trainable(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a trainable module to the device in fp32."""
        return module.to(device=self.device, dtype=self.trainable_dtype)

    def autocast(self):
        """Context for forward passes: autocast in the base dtype on CUDA, nothing elsewhere."""
        if self.device.type == "cuda" and self.base_dtype != torch.float32:
            return torch.autocast(device_type="cuda", dtype=self.base_dtype)
        return contextlib.nullcontext()

    def seed(self, seed: int) -> None:
        """Seed Python's and torch's generators for this job's device."""
        random.seed(seed)
        if self.device.type == "cpu":
            # A CPU job draws only from the CPU generator. torch.manual_seed would also queue a
            # lazy seeding of each accelerator backend not initialised (CUDA, XPU, MTIA), and
            # each of those formats the whole call stack: ~0.5 ms a job at a Celery worker's depth.
            torch.default_generator.manual_seed(seed)
            return
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    @property
    def tracks_peak(self) -> bool:
        """True when the device or the kernel keeps the job's peak memory (CUDA; Linux on the CPU);
        otherwise the peak is sampled with `sample_memory` between training steps."""
        return self.device.type == "cuda" or self._kernel_peak

    def reset_peak_memory(self) -> None:
        """Start measuring this job's peak memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            # Linux keeps the peak RSS itself (VmHWM), including peaks inside a step that
            # sampling between steps misses, and resets it on request: no per-step sampling
            # (reading /proc each step cost ~0.17 ms, 1% of a tiny model's training step).
            self._kernel_peak = _reset_kernel_peak_rss()
        self._rss_peak = _rss_bytes()

    def sample_memory(self) -> None:
        """Record the current memory use where nothing keeps the peak; call now and then during a job."""
        if self.device.type == "cpu" and not self._kernel_peak:
            self._rss_peak = max(self._rss_peak, _rss_bytes())

    def peak_memory_mb(self) -> float:
        """Peak accelerator memory on CUDA, otherwise the peak process RSS during the job."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.device.type == "mps":
            return torch.mps.current_allocated_memory() / 2**20
        if self._kernel_peak:
            peak = _kernel_peak_rss_bytes()  # never below the RSS when the job started
            if peak is not None:
                return peak / 2**20
        self._rss_peak = max(self._rss_peak, _rss_bytes())
        return self._rss_peak / 2**20

    def release(self) -> None:
        """Free cached memory between jobs. Call after the job's references are dropped."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_kernel_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process to its current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:  # Linux 4.0+: "5" resets VmHWM only
            handle.write("5")
    except OSError:
        return False
    return _kernel_peak_rss_bytes() is not None


def _kernel_peak_rss_bytes() -> int | None:
    """VmHWM from /proc/self/status in bytes, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
