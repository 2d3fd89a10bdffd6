"""Benchmark-only instrumentation of worker processes (never part of graftq itself).

`bench_dispatch.py` puts this directory on the PYTHONPATH of the `graftq worker` it starts,
with GRAFTQ_BENCH_TIMINGS naming a file. Python imports `sitecustomize` at start-up in every
process (the launcher and its Celery children); when `worker.pipeline` is first imported, its
`run_job` is wrapped so that each call appends `{"job_id", "start", "end"}` (wall clock,
time.time()) to that file. That splits a job's time on the worker into the pipeline itself
and everything graftq's queue side adds around it (claim, progress, recording, fetching the
next message). Without GRAFTQ_BENCH_TIMINGS this module does nothing.
"""

from __future__ import annotations

import os
import sys

_LOG = os.environ.get("GRAFTQ_BENCH_TIMINGS")


def _wrap(module) -> None:
    import json
    import time

    original = module.run_job

    def run_job(ctx):
        start = time.time()
        outcome = original(ctx)
        end = time.time()
        with open(_LOG, "a") as handle:
            handle.write(json.dumps({"job_id": ctx.job_id, "start": start, "end": end}) + "\n")
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
