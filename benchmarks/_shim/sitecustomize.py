"""Benchmark-only instrumentation of worker processes (never part of graftq itself).

`bench_dispatch.py` puts this directory on the PYTHONPATH of the `graftq worker` it starts,
with GRAFTQ_BENCH_TIMINGS naming a file. Python imports `sitecustomize` at start-up in every
process (the launcher and its Celery children); when `worker.pipeline` is first imported, its
`run_job` is wrapped so that each call appends `{"job_id", "start", "end"}` (wall clock,
time.time()) to that file. That splits a job's time on the worker into the pipeline itself
and everything graftq's queue side adds around it (claim, progress, recording, fetching the
next message). Without GRAFTQ_BENCH_TIMINGS this module does nothing.

With GRAFTQ_BENCH_LOCKSTEP as well (a Redis URL), the benchmark's jobs (tasks `t0000`,
`t0001`, ...) end every GRAFTQ_BENCH_LOCKSTEP_EVERY-th one with a lockstep turn: the wrapper
pushes the task name to `lockstep:go` and waits on `lockstep:done`, while a reference process
runs the same stretch of jobs through the pipeline. The time waited is written with the job's
timings (`waited`), so the benchmark takes it out of the queue's clock: the worker and the
reference loop take turns of a second or so and see the same machine.
"""

from __future__ import annotations

import os
import sys

_LOG = os.environ.get("GRAFTQ_BENCH_TIMINGS")
_LOCKSTEP = os.environ.get("GRAFTQ_BENCH_LOCKSTEP")
_EVERY = int(os.environ.get("GRAFTQ_BENCH_LOCKSTEP_EVERY", "20"))


def _lockstep_turn(client, task: str) -> float:
    """Hand the reference process its turn (the stretch of jobs up to `task`); seconds waited."""
    import time

    if not (task.startswith("t") and task[1:].isdigit() and int(task[1:]) % _EVERY == _EVERY - 1):
        return 0.0
    started = time.time()
    client.lpush("lockstep:go", task)
    if client.brpop("lockstep:done", timeout=600) is None:
        raise RuntimeError("benchmark lockstep: the reference process did not answer within 600 s")
    return time.time() - started


def _wrap(module) -> None:
    import json
    import time

    original = module.run_job
    client = None
    if _LOCKSTEP:
        import redis

        client = redis.Redis.from_url(_LOCKSTEP, socket_timeout=None)  # it waits for whole jobs

    def run_job(ctx):
        start = time.time()
        try:
            outcome = original(ctx)
        finally:
            end = time.time()
            waited = _lockstep_turn(client, ctx.spec.task) if client is not None else 0.0
        with open(_LOG, "a") as handle:
            handle.write(json.dumps({"job_id": ctx.job_id, "start": start, "end": end, "waited": waited}) + "\n")
        return outcome

    module.run_job = run_job


if _LOG:
    import importlib.abc
    import importlib.util

    class _PipelineHook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "worker.pipeline":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _wrap(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PipelineHook())
