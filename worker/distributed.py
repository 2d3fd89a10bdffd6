"""One job on several devices: data-parallel ranks under the worker process that claimed the job.

A job with `resources.gpus: N` (N > 1) runs as N processes, started by the worker process that
holds its claim (`run_job`). That process keeps what it keeps for any job: the claim, the
heartbeat, cancel and shutdown requests, progress and the outcome; it never touches a device.
Rank r is pinned to its device with CUDA_VISIBLE_DEVICES (its `cuda:0`; "" on a CPU host) and
runs the ordinary pipeline with a process group (NCCL on CUDA, gloo on CPU, env:// init on a
free local port). Each rank takes its share of every micro-batch of every optimizer step, and
the gradients are summed across ranks before the step (`DataParallel.accumulate`), so every
rank takes the same step as one process running the whole batch would.

Rank 0 writes the checkpoints and the artifacts, evaluates, and reports progress and the
outcome; the other ranks only compute. Rank 0's report decides: when it ends (success, error,
cancel, hand-back) the other ranks are ended. A rank that dies without reporting (killed,
crashed) ends the others and raises `RankLost`, a `TransientError`: the job is re-queued like
the job of a dead worker and resumes from rank 0's last checkpoint. A rank left waiting in a
collective for a dead peer fails (gloo: connection closed; or the collective timeout), and is
ended by the supervising process anyway; ranks end themselves when that process is gone.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import JobError, JobInterrupted, TransientError

if TYPE_CHECKING:
    import torch

    from worker.pipeline import JobContext, JobOutcome
    from worker.training import Trainer

log = logging.getLogger(__name__)

#: Seconds a collective waits for a peer: covers rank 0 evaluating while the others wait at the
#: next step. A dead peer is noticed sooner, by its closed connection or by the supervisor.
COLLECTIVE_TIMEOUT = 1800.0
#: Seconds the supervisor waits, after one rank failed, for the others' reports.
REPORT_GRACE = 5.0
_POLL = 0.2

CONTINUE, CANCEL, INTERRUPT = 0, 1, 2


class RankLost(TransientError):
    """A rank of a multi-device job died, or a collective failed because a peer is gone."""


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a rank process (shown as the cause of the error)."""

    def __str__(self) -> str:
        return self.args[0]


def default_slots(device: str, count: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES values for `count` ranks where no worker handed out devices (`graftq run`).

    CPU ranks ("") for `device: cpu`, or `auto` without CUDA; else the first `count` visible GPUs.
    Raises JobError when `device: cuda` asks for more GPUs than this machine shows.
    """
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return [""] * count
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    listed = [entry.strip() for entry in visible.split(",")] if visible else []
    available = torch.cuda.device_count()
    if available < count:
        raise JobError(f"resources.gpus: the job asks for {count} GPUs and this machine shows {available}; "
                       "lower resources.gpus, or run it on a pool worker with that many GPUs")
    return [listed[index] if index < len(listed) else str(index) for index in range(count)]


@dataclass(frozen=True)
class RankSetup:
    """What a rank process needs: plain data, so that it pickles into the rank process."""

    rank: int
    world_size: int
    slot: str  #: this rank's CUDA_VISIBLE_DEVICES ("" on a CPU)
    port: int
    job_id: str
    batch_id: str
    spec: dict[str, Any]
    artifacts_root: str  #: a directory, or an `s3://` URL (rank 0's)
    checkpoint_dir: str
    needed_dirs: dict[str, str] = field(default_factory=dict)
    progress_interval: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    batch_name: str | None = None


def run_job(ctx: JobContext, slots: Sequence[str] | None = None) -> JobOutcome:
    """Run `ctx`'s job as `resources.gpus` ranks on `slots` (CUDA_VISIBLE_DEVICES values, one per
    rank; default `default_slots`); returns rank 0's outcome.

    Raises what rank 0 raised (JobError, JobCancelled, JobInterrupted, ...), the error of another
    rank that failed first, or RankLost when a rank died without saying why.
    """
    world = ctx.spec.resources.gpus
    slots = list(slots) if slots is not None else default_slots(ctx.spec.device, world)
    if len(slots) != world:
        raise JobError(f"resources.gpus: the job asks for {world} devices and the worker gave it {len(slots)}")
    if ctx.spec.train is not None and ctx.spec.train.checkpoint_every:
        from worker.storage import JobStore

        # a checkpoint in the bucket comes down before any rank starts: every rank resumes from it
        JobStore(ctx.artifacts_root, ctx.batch_id, ctx.job_id).restore_checkpoint(ctx.resume_dir)
    context = _rank_context()
    messages = context.Queue()
    stop_code = context.Value("i", CONTINUE)
    scratch = Path(tempfile.mkdtemp(prefix=f"graftq-{ctx.job_id}-ranks-"))
    port = _free_port()
    ranks: list[Any] = []
    try:
        for rank, slot in enumerate(slots):
            setup = RankSetup(
                rank=rank, world_size=world, slot=slot, port=port, job_id=ctx.job_id, batch_id=ctx.batch_id,
                spec=ctx.spec.to_json(),
                # the other ranks save their (identical) artifacts where nobody reads them
                artifacts_root=str(ctx.artifacts_root if rank == 0 else scratch),
                checkpoint_dir=str(ctx.resume_dir),
                needed_dirs={job_id: str(path) for job_id, path in ctx.needed_dirs.items()},
                progress_interval=ctx.progress_interval, params=dict(ctx.params), batch_name=ctx.batch_name,
            )
            process = context.Process(target=_rank_main, args=(setup, messages, stop_code),
                                    name=f"graftq-rank-{rank}", daemon=False)
            process.start()
            ranks.append(process)
        log.info("job %s: %d ranks started (pids %s) on %s", ctx.job_id, world,
                 " ".join(str(process.pid) for process in ranks),
                 ", ".join(slot or "cpu" for slot in slots))
        return _Supervisor(ctx, ranks, messages, stop_code).wait()
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
        for process in ranks:
            process.join(timeout=10)
        messages.cancel_join_thread()
        messages.close()
        shutil.rmtree(scratch, ignore_errors=True)


#: What the fork server imports once, so that each rank of each job starts without importing them.
_PRELOAD = ["torch", "torch.distributed", "transformers", "peft", "worker.pipeline", "worker.training",
            "worker.models", "worker.extensions", "worker.data", "worker.device"]


def _rank_context() -> Any:
    """Ranks are forked from a fork server that imported the ML stack but never touched CUDA, so
    they start in a moment and inherit nothing CUDA-related; it lives as long as this process."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Supervisor:
    """Passes stop requests to rank 0, progress to the job's row, and decides the outcome."""

    def __init__(self, ctx: JobContext, ranks: list[Any], messages: Any, stop_code: Any):
        self.ctx = ctx
        self.ranks = ranks
        self.messages = messages
        self.stop_code = stop_code
        #: rank -> ("done", outcome) or ("error", error)
        self.reports: dict[int, tuple[str, Any]] = {}

    def wait(self) -> JobOutcome:
        while 0 not in self.reports:
            self._pass_stop_request()
            if self._receive(_POLL):
                if any(kind == "error" for kind, _ in self.reports.values()):
                    self._wait_for_reports(REPORT_GRACE)
                    break
                continue
            lost = self._lost()
            if lost:
                self._end_others()
                raise self._lost_error(lost)
        lost = self._lost()  # before the others are ended on purpose
        self._end_others()
        kind, payload = self.reports.get(0, ("error", None))
        if kind == "done":
            return payload
        raise self._choose_error(lost)

    def _pass_stop_request(self) -> None:
        if self.stop_code.value != CONTINUE or self.ctx.should_cancel is None:
            return
        try:
            if self.ctx.should_cancel():
                self.stop_code.value = CANCEL
        except JobInterrupted:
            self.stop_code.value = INTERRUPT

    def _receive(self, timeout: float) -> bool:
        """Take one message (progress, or a rank's report); False when none came in `timeout` s."""
        try:
            kind, rank, payload = self.messages.get(timeout=timeout)
        except queue.Empty:
            return False
        if kind == "progress":
            if self.ctx.on_progress is not None:
                self.ctx.on_progress(payload)
        elif kind == "error":
            self.reports[rank] = (kind, _unpack_error(*payload))
        else:
            self.reports[rank] = (kind, payload)
        return True

    def _lost(self) -> list[Any]:
        """Ranks that ended without a report (after reading what is left in the queue)."""
        ended = [rank for rank, process in enumerate(self.ranks)
                 if rank not in self.reports and process.exitcode is not None]
        if ended:
            while self._receive(0.05):  # a report written just before the exit
                pass
        return [rank for rank in ended if rank not in self.reports]

    def _wait_for_reports(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while len(self.reports) < len(self.ranks) and time.monotonic() < deadline:
            if not self._receive(_POLL) and self._lost():
                return

    def _end_others(self) -> None:
        for process in self.ranks:
            if process.is_alive():
                process.kill()
        for process in self.ranks:
            process.join(timeout=10)

    def _lost_error(self, lost: list[int]) -> RankLost:
        rank = lost[0]
        code = self.ranks[rank].exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else \
            f"exited with status {code} without a report"
        return RankLost(f"rank {rank} of {len(self.ranks)} (pid {self.ranks[rank].pid}) {how}; the job "
                        "resumes from its last checkpoint when it runs again")

    def _choose_error(self, lost: list[int]) -> BaseException:
        if lost:
            return self._lost_error(lost)
        errors = [payload for _, (kind, payload) in sorted(self.reports.items()) if kind == "error"]
        # A failed collective is the echo of another rank's failure: name that failure instead.
        for error in errors:
            if not isinstance(error, RankLost):
                return error
        if errors:
            return errors[0]
        return RankLost(f"rank 0 of {len(self.ranks)} ended without a report")


def _pack_error(error: BaseException) -> tuple[bytes | None, str, str]:
    text = "".join(traceback.format_exception(error))
    try:
        return pickle.dumps(error), f"{type(error).__name__}: {error}", text
    except Exception:  # an exception that does not pickle: its text is kept
        return None, f"{type(error).__name__}: {error}", text


def _unpack_error(pickled: bytes | None, message: str, text: str) -> BaseException:
    error: BaseException
    try:
        error = pickle.loads(pickled) if pickled is not None else JobError(message)
    except Exception:
        error = JobError(message)
    error.__cause__ = _RemoteTraceback(text)
    return error


# -- inside a rank process ----------------------------------------------------------------------

_current: DataParallel | None = None


def data_parallel() -> DataParallel | None:
    """This process's place in a multi-device job (None in an ordinary worker process)."""
    return _current


def _rank_main(setup: RankSetup, messages: Any, stop_code: Any) -> None:
    """A rank process: run the pipeline in the process group; report the outcome or the error."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping is the supervising process's decision
    os.environ.update(CUDA_VISIBLE_DEVICES=setup.slot, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(setup.port),
                      RANK=str(setup.rank), WORLD_SIZE=str(setup.world_size), LOCAL_RANK=str(setup.rank))
    try:
        outcome = _run_rank(setup, messages, stop_code)
    except BaseException as error:
        messages.put(("error", setup.rank, _pack_error(error)))
        sys.exit(1)
    messages.put(("done", setup.rank, outcome if setup.rank == 0 else None))


def _die_with_parent() -> None:
    """End this rank as soon as the process that started it is gone (killed, say). Its OS parent is
    the fork server, which lives on while any rank holds its pipe: a watch thread ends the rank."""
    supervisor = multiprocessing.parent_process()

    def watch() -> None:
        supervisor.join()
        os._exit(1)

    if supervisor is not None:
        threading.Thread(target=watch, name="graftq-rank-watch", daemon=True).start()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: and when the fork server goes
    except (OSError, AttributeError):  # not Linux
        pass


def _run_rank(setup: RankSetup, messages: Any, stop_code: Any) -> JobOutcome | None:
    global _current
    import torch
    import torch.distributed as dist

    from jobs.spec import JobSpec
    from worker import pipeline

    spec = JobSpec.model_validate(setup.spec)
    main = setup.rank == 0
    if not main and spec.train is not None and spec.train.report_to:  # rank 0 reports to the trackers
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"report_to": []})})
    use_cuda = spec.device != "cpu" and torch.cuda.is_available()
    if not use_cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // setup.world_size))
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=setup.rank, world_size=setup.world_size,
                            timeout=dt.timedelta(seconds=COLLECTIVE_TIMEOUT))
    _current = DataParallel(setup.rank, setup.world_size, torch.device("cuda:0" if use_cuda else "cpu"))

    def should_cancel() -> bool:
        # Only rank 0 stops on request; the others are ended once it reported.
        code = stop_code.value if main else CONTINUE
        if code == INTERRUPT:
            raise JobInterrupted("the worker is shutting down")
        return code == CANCEL

    ctx = pipeline.JobContext(
        job_id=setup.job_id, batch_id=setup.batch_id, spec=spec, artifacts_root=setup.artifacts_root,
        on_progress=(lambda progress: messages.put(("progress", 0, progress))) if main else None,
        should_cancel=should_cancel, checkpoint_dir=Path(setup.checkpoint_dir),
        progress_interval=setup.progress_interval,
        needed_dirs={job_id: Path(path) for job_id, path in setup.needed_dirs.items()},
        params=setup.params, batch_name=setup.batch_name,
    )
    try:
        outcome = pipeline.run_job(ctx)
    finally:
        _current = None
    dist.destroy_process_group()
    return outcome


class DataParallel:
    """A rank's share of the work of a training step, and the sum of the gradients across ranks."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank = rank
        self.world_size = world_size
        #: where collectives run: NCCL takes CUDA tensors, gloo CPU ones
        self.device = device
        self.is_main = rank == 0
        self._synced = False

    def accumulate(self, trainer: Trainer, micro_batches: list[list[Any]]) -> float:
        """Backward over this rank's share of the step's micro-batches, then sum the gradients of all
        ranks; returns the step's loss (the same on every rank).

        Each share's mean loss is weighted by its share of the whole step's target tokens, so the
        summed gradient is that of the mean over all of them: what one process computes.
        """
        from worker.data import collate

        if not self._synced:  # the same start on every rank, whatever the seed did
            self._broadcast(trainer.params)
            self._synced = True
        total = sum(trainer._label_tokens(collate(examples, trainer.task_type, trainer.pad_id))
                    for examples in micro_batches)
        value = 0.0
        for examples in micro_batches:
            share = examples[self.rank::self.world_size]
            if not share:
                continue
            batch = collate(share, trainer.task_type, trainer.pad_id)
            count = trainer._label_tokens(batch)
            if count == 0:
                continue
            loss = trainer._loss(batch) * (count / max(total, 1))
            trainer.scaler.scale(loss).backward()
            value += float(loss.detach())
            del loss
        return self._sum_gradients(trainer.params, value)

    def first_rank_says(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank: only rank 0 evaluates, and all ranks must stop training at
        the same step (early stopping) or the others would wait in the next step's all-reduce."""
        import torch
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._collective(dist.broadcast, value, src=0)
        return bool(value.item())

    def _broadcast(self, params: list[torch.Tensor]) -> None:
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for param in params:
                moved = param.data.to(self.device)
                self._collective(dist.broadcast, moved, src=0)
                if moved is not param.data:
                    param.data.copy_(moved)

    def _sum_gradients(self, params: list[torch.Tensor], value: float) -> float:
        """All-reduce (sum) every trainable parameter's gradient and the loss in one flat buffer."""
        import torch
        import torch.distributed as dist

        grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in params]
        flat = torch.cat([*(grad.reshape(-1).to(self.device, torch.float32) for grad in grads),
                          torch.tensor([value], device=self.device, dtype=torch.float32)])
        self._collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            size = grad.numel()
            param.grad = flat[offset:offset + size].view_as(param).to(param.device, grad.dtype)
            offset += size
        return float(flat[-1])

    def _collective(self, operation: Any, *args: Any, **kwargs: Any) -> None:
        try:
            operation(*args, **kwargs)
        except RuntimeError as error:  # gloo/NCCL: a peer closed the connection, or the timeout passed
            raise RankLost(f"rank {self.rank} of {self.world_size}: a collective failed, another rank of the "
                           f"job is gone: {error}") from None


# -- the devices of one `graftq worker` host, shared by its worker processes ---------------------

#: Set by the launcher: the lock directory, the host's devices (CUDA_VISIBLE_DEVICES values, `cpu`
#: for a CPU slot), and for each worker process its device (one-device workers) or its job size.
SLOTS_DIR_ENV = "GRAFTQ_SLOTS_DIR"
SLOTS_ENV = "GRAFTQ_SLOTS"
WORKER_SLOT_ENV = "GRAFTQ_WORKER_SLOT"
WORKER_SIZE_ENV = "GRAFTQ_WORKER_SIZE"
#: Seconds a one-device worker waits for its device, taken by a multi-device job, before it gives
#: the message back to the queue for another worker.
BUSY_WAIT = 5.0


class DevicesBusy(Exception):
    """The devices a delivery needs are taken; the message goes back to the queue unclaimed."""


class HostDevices:
    """Who uses which device of a host, with one lock file per device (flock).

    A one-device worker holds its device's lock shared while it runs a job, so several processes
    of one device (`--jobs-per-gpu`) do not exclude each other. A multi-device worker gathers N
    locks exclusively: it takes any device that is free, keeps it, and waits for the rest, so
    the one-device workers of the devices it holds pause (their deliveries go back to the queue)
    until its job ends. One gatherer at a time (`gather.lock`): two jobs each holding half of
    what they need would wait for each other forever.
    """

    def __init__(self, directory: Path, devices: Sequence[str]):
        self.directory = Path(directory)
        self.devices = list(devices)

    def _open(self, name: str) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        return os.open(self.directory / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)

    @staticmethod
    def _try(fd: int, mode: int) -> bool:
        import fcntl

        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @contextmanager
    def one(self, index: int, wait: float = BUSY_WAIT, poll: float = 0.1) -> Iterator[None]:
        """Hold device `index` (shared) for a one-device job; raises DevicesBusy after `wait` s."""
        import fcntl

        fd = self._open(f"device-{index}")
        try:
            deadline = time.monotonic() + wait
            while not self._try(fd, fcntl.LOCK_SH):
                if time.monotonic() >= deadline:
                    raise DevicesBusy(f"device {index} ({self.devices[index] or 'cpu'}) runs a multi-device job")
                time.sleep(poll)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    @contextmanager
    def gather(self, count: int, give_up: Callable[[], bool] = lambda: False,
               poll: float = 0.2) -> Iterator[list[str]]:
        """Hold `count` devices (exclusive); yields their CUDA_VISIBLE_DEVICES values ("" for a CPU).

        Waits until that many are free; raises DevicesBusy when `give_up()` says so first, and
        JobError when the host has fewer devices.
        """
        import fcntl

        if count > len(self.devices):
            raise JobError(f"resources.gpus: the job asks for {count} devices and this worker has "
                           f"{len(self.devices)}")
        gate = self._open("gather")
        held: dict[int, int] = {}
        try:
            while not self._try(gate, fcntl.LOCK_EX):
                self._wait(give_up, poll)
            while len(held) < count:
                for index in range(len(self.devices)):
                    if index in held or len(held) == count:
                        continue
                    fd = self._open(f"device-{index}")
                    if self._try(fd, fcntl.LOCK_EX):
                        held[index] = fd
                    else:
                        os.close(fd)
                if len(held) < count:
                    self._wait(give_up, poll)
            fcntl.flock(gate, fcntl.LOCK_UN)
            yield ["" if self.devices[index] == "cpu" else self.devices[index] for index in sorted(held)]
        finally:
            for fd in held.values():
                os.close(fd)
            os.close(gate)

    @staticmethod
    def _wait(give_up: Callable[[], bool], poll: float) -> None:
        if give_up():
            raise DevicesBusy("the worker stops before the devices for the job were free")
        time.sleep(poll)


def slot_env(directory: str, devices: Sequence[str], *, slot: int | None = None,
             size: int | None = None) -> dict[str, str]:
    """The environment that makes a launcher's worker process share the host's devices."""
    env = {SLOTS_DIR_ENV: directory, SLOTS_ENV: ",".join(devices)}
    if slot is not None:
        env[WORKER_SLOT_ENV] = str(slot)
    if size is not None:
        env[WORKER_SIZE_ENV] = str(size)
    return env


@contextmanager
def worker_devices(give_up: Callable[[], bool] = lambda: False) -> Iterator[list[str] | None]:
    """What this worker process may use for its next job, held until the job ends.

    A multi-device worker yields the devices it gathered; a one-device worker holds its own
    device and yields None (its device is its CUDA_VISIBLE_DEVICES), as does a process that
    `graftq worker` did not start. Raises DevicesBusy (see `HostDevices`).
    """
    directory = os.environ.get(SLOTS_DIR_ENV)
    if not directory:
        yield None
        return
    host = HostDevices(Path(directory), os.environ.get(SLOTS_ENV, "").split(","))
    size = os.environ.get(WORKER_SIZE_ENV)
    if size:
        with host.gather(int(size), give_up) as devices:
            yield devices
    else:
        with host.one(int(os.environ.get(WORKER_SLOT_ENV, "0"))):
            yield None
