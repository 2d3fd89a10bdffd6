"""The pipeline runs on a frame stack of its own size, whatever the caller's depth.

CPython keeps frames in 16 KiB chunks and unmaps a chunk as soon as its first frame returns:
recursion that oscillates across a chunk boundary maps and faults in a fresh chunk every time.
A Celery worker calls the pipeline from a much deeper stack than a plain loop does, and the
same jobs run measurably slower there without the trampoline (benchmarks/README.md, `dispatch`).
"""

from __future__ import annotations

import platform
import resource

import pytest

from worker.pipeline import _roomy_stack_call

pytestmark = pytest.mark.skipif(platform.python_implementation() != "CPython", reason="CPython's frame stack")


def _dive(depth: int) -> int:
    return 0 if depth == 0 else _dive(depth - 1) + 1


def _workload() -> None:
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


def test_a_job_maps_no_stack_chunks_whatever_the_callers_depth():
    if _worst_page_faults(_workload) < 1000:
        pytest.skip("this Python does not unmap frame-stack chunks at every return")
    call = _roomy_stack_call()  # built (and cached) before the measurement
    assert _worst_page_faults(lambda: call(_workload)) < 200


def test_the_trampoline_passes_arguments_results_and_errors_through():
    assert _roomy_stack_call()(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError, match="missing"):
        _roomy_stack_call()({}.__getitem__, "missing")
