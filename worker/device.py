"""Device and dtype policy (the README's "Devices" paragraph).

- frozen base weights (`dtype: auto`): bf16 on CUDA of compute capability 8.0 or newer (where
  bf16 runs natively), fp16 on older CUDA except for T5-family bases (T5 overflows in fp16),
  which stay fp32 there; fp32 on MPS/CPU. A job's `dtype` key overrides the policy. Only
  floating parameters take the base dtype: buffers (rotary `inv_freq`) keep theirs;
- trainable parameters (LoRA adapters, the added block): always fp32;
- with a low-precision base the forward pass runs under the device's autocast, so fp32
  trainable modules and low-precision frozen ones mix without casts in model code; fp16 adds
  loss scaling (`grad_scaler`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random

import torch

from worker.architectures import ARCHITECTURES
from worker.errors import DeviceError, is_sticky_cuda_error

log = logging.getLogger(__name__)

_DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: native bf16 matmuls start with Ampere; older GPUs report bf16 support but emulate it, slowly
BF16_MIN_CAPABILITY = (8, 0)


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


def get_dtype(device: torch.device, family: str | None = None) -> torch.dtype:
    """The `dtype: auto` policy: the dtype of frozen base weights of a `family` base on `device`.

    `family` is `worker.architectures.Architecture.family` ("t5", "llama", ...), or None when unknown.
    """
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY:
        return torch.bfloat16
    if _overflows_in_fp16(family):
        return torch.float32
    return torch.float16


def _overflows_in_fp16(family: str | None) -> bool:
    arch = ARCHITECTURES.get(family) if family is not None else None
    return arch is not None and arch.overflows_in_fp16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DeviceManager:
    """Resolves the device once and applies the dtype policy, seeding and memory measurement."""

    def __init__(self, device: str = "auto", base_dtype: str = "auto", family: str | None = None):
        """`base_dtype`: `auto` (the policy, see `get_dtype`) or a name in DTYPES; `family`: the base's."""
        self.requested = device
        self.device = get_device(device)
        if base_dtype == "auto":
            self.base_dtype = get_dtype(self.device, family)
            if _overflows_in_fp16(family) and self.base_dtype == torch.float32 and self.device.type == "cuda":
                log.info("%s base kept in float32 on %s: no native bfloat16 there, and %s overflows in "
                         "float16", family, self.device, family)
        else:
            self.base_dtype = DTYPES[base_dtype]
            if _overflows_in_fp16(family) and self.base_dtype == torch.float16:
                log.warning("dtype: float16 on a %s base as asked; %s tends to overflow in float16 "
                            "(a non-finite loss fails the job): bfloat16 or float32 are safe", family, family)
        self.trainable_dtype = torch.float32
        self._peak = 0
        #: the kernel keeps this job's peak RSS (Linux: VmHWM, reset per job); no sampling needed
        self._kernel_peak = False

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.base_dtype)

    def place_base(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a frozen base model to the device with its fp32 parameters in the base dtype.

        Buffers keep their dtype: LLaMA's rotary `inv_freq` in bf16 turns far positions by
        radians. Parameters already in another dtype stay.
        """
        cast: dict[int, torch.nn.Parameter] = {}  # tied parameters stay tied
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.dtype == torch.float32 and self.base_dtype != torch.float32:
                    if id(param) not in cast:
                        cast[id(param)] = torch.nn.Parameter(param.detach().to(self.base_dtype),
                                                             requires_grad=param.requires_grad)
                    setattr(module, name, cast[id(param)])
        return model.to(self.device)  # after the cast: no fp32 copy on the device

    def place_trainable(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a trainable module to the device in fp32."""
        return module.to(device=self.device, dtype=self.trainable_dtype)

    def autocast(self):
        """Context for forward passes: the device's autocast in a low-precision base dtype, else nothing."""
        if self.base_dtype != torch.float32:
            return torch.autocast(device_type=self.device.type, dtype=self.base_dtype)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (small gradients underflow to zero without it); a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.base_dtype == torch.float16)

    def seed(self, seed: int) -> None:
        """Seed Python's and torch's generators (every device's)."""
        random.seed(seed)
        torch.manual_seed(seed)

    def reset_peak_memory(self) -> None:
        """Start measuring this job's peak memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            # Linux keeps the peak RSS itself (VmHWM), including peaks inside a step that
            # sampling between steps misses, and resets it on request: no per-step sampling.
            self._kernel_peak = _reset_kernel_peak_rss()
        self._peak = 0
        self.sample_memory()

    def sample_memory(self) -> None:
        """Record the current memory use where nothing keeps the peak; call now and then during a job."""
        if self.device.type == "mps":  # MPS keeps no peak: the driver's allocation, sampled
            self._peak = max(self._peak, torch.mps.driver_allocated_memory())
        elif self.device.type == "cpu" and not self._kernel_peak:
            self._peak = max(self._peak, _rss_bytes())

    def peak_memory_mb(self) -> float:
        """Peak accelerator memory on CUDA, the sampled peak on MPS, the peak process RSS on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._kernel_peak and (peak := _kernel_peak_rss_bytes()) is not None:
            return peak / 2**20  # never below the RSS when the job started
        self._kernel_peak = False
        self.sample_memory()
        return self._peak / 2**20

    def release(self) -> None:
        """Free cached memory between jobs. Call after the job's references are dropped."""
        release_memory()


def release_memory() -> None:
    """Collect garbage and return cached accelerator memory to the driver."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
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
