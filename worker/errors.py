"""Errors raised by the worker side.

`JobError` is a deterministic failure of one job (bad data, unknown module, out of memory):
re-running it gives the same result, so it is never retried. `TransientError` marks the few
failures that a retry can cure (the broker or database connection went away).
"""


class JobError(Exception):
    """A deterministic failure of a job; the message says what to change."""


class ConfigError(JobError):
    """The spec cannot be applied to this model (unknown target module, bad position, ...)."""


class DeviceError(JobError):
    """The requested device is missing or does not work."""


class OutOfMemory(JobError):
    """The job ran out of accelerator memory; `phase` is where (`train` or `eval`), `step` the
    optimizer steps done by then (the OOM back-off re-runs a `train` one with a smaller micro-batch)."""

    def __init__(self, message: str, *, phase: str | None = None, step: int | None = None):
        super().__init__(message)
        self.phase = phase
        self.step = step


#: Phrases of CUDA errors after which the process's CUDA context is unusable.
STICKY_CUDA_ERRORS = ("device-side assert", "illegal memory access", "unspecified launch failure",
                      "CUDA error: misaligned address", "uncorrectable ECC error")


def is_sticky_cuda_error(error: BaseException) -> bool:
    """True when `error` leaves this process's CUDA context unusable: only a new process recovers."""
    return any(phrase in str(error) for phrase in STICKY_CUDA_ERRORS)


class TransientError(Exception):
    """A failure worth retrying: lost broker or database connection."""


class JobCancelled(Exception):
    """Raised inside the pipeline when the job's cancel check says stop."""




class JobInterrupted(Exception):
    """Raised by the stop check when the worker is shutting down (SIGTERM): the trainer saves a
    checkpoint first, and the task hands the job back to the queue for another worker to resume.
    """
