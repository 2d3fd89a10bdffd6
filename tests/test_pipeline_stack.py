"""The pipeline runs a job on a thread of its own: the job's frame stack starts empty, whatever the caller's depth.

CPython keeps frames in 16 KiB chunks and unmaps a chunk as soon as its first frame returns:
recursion that oscillates across a chunk boundary maps and faults in a fresh chunk every time.
A Celery worker calls the pipeline from a much deeper stack than a plain loop does, and the
same jobs run measurably slower there on the caller's thread (benchmarks/README.md, `dispatch`).
"""

from __future__ import annotations

import platform
import resource
import threading
from pathlib import Path

import pytest

from jobs.spec import JobSpec
from worker.pipeline import JobContext, _on_own_thread

SPEC = JobSpec(task="t", kind="create", extension="lora", base_model="random:t5-tiny", device="cpu")


def _context(**fields) -> JobContext:
    return JobContext(job_id="j1", batch_id="b1", spec=SPEC, artifacts_root=Path("."), **fields)


def _dive(depth: int) -> int:
    return 0 if depth == 0 else _dive(depth - 1) + 1


def _workload(ctx: JobContext) -> None:
    for _ in range(2000):  # 2,000 round trips 40 frames deep, like deepcopy over a module tree
        _dive(40)


def _at_depth(depth: int, function):
    return function() if depth == 0 else _at_depth(depth - 1, function)


def _worst_page_faults(call) -> int:
    worst = 0
    for depth in range(0, 120, 3):  # callers of every depth: some put a chunk boundary mid-workload
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _at_depth(depth, call)
        worst = max(worst, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return worst


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="CPython's frame stack")
def test_a_job_maps_no_stack_chunks_whatever_the_callers_depth():
    on_caller = _worst_page_faults(lambda: _workload(_context()))
    if on_caller < 1000:
        pytest.skip("this Python does not unmap frame-stack chunks at every return")
    # what is left is the new thread's own start (its stack and thread state), not the workload
    assert _worst_page_faults(lambda: _on_own_thread(_workload, _context())) < on_caller / 4


def test_the_job_thread_passes_results_and_errors_through():
    assert _on_own_thread(lambda ctx: ctx.job_id, _context()) == "j1"
    with pytest.raises(KeyError, match="missing"):
        _on_own_thread(lambda ctx: {}["missing"], _context())


def test_an_interrupted_wait_tells_the_job_to_stop_at_its_next_step(monkeypatch):
    steps: list[bool] = []
    started = threading.Event()

    def job(ctx: JobContext) -> None:
        started.set()
        while not ctx.should_cancel():  # a trainer polls this between steps
            steps.append(True)
            threading.Event().wait(0.01)

    join = threading.Thread.join

    def interrupted_join(self, timeout=None):
        if self.name.startswith("graftq-job") and timeout is None:
            started.wait(5)
            raise KeyboardInterrupt  # Ctrl-C arrives in the caller's thread while it waits
        return join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        _on_own_thread(job, _context(should_cancel=lambda: False))
    assert not [t for t in threading.enumerate() if t.name.startswith("graftq-job")]
