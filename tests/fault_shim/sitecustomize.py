"""Test-only fault injection for `graftq worker` processes started by tests/test_faults.py.

Python imports `sitecustomize` at start-up from the PYTHONPATH; the fault tests put this
directory first on the workers' PYTHONPATH. Product code knows nothing of it.

GRAFTQ_TEST_CRASH_TASK=<task name>: a worker process that runs a job with that task name dies
at once after claiming it, every time, of SIGKILL: as the kernel's OOM killer or a crash in
native code would end it (SIGKILL rather than SIGSEGV, which would leave a core file).
"""

import os

_CRASH_TASK = os.environ.get("GRAFTQ_TEST_CRASH_TASK")

if _CRASH_TASK:
    from celery.signals import task_prerun

    @task_prerun.connect
    def _crash_in_the_pipeline(**_):
        import signal

        from worker import pipeline

        run_job = pipeline.run_job
        if getattr(run_job, "crashes", False):
            return

        def crashing_run_job(ctx):
            if ctx.spec.task == _CRASH_TASK:
                os.kill(os.getpid(), signal.SIGKILL)
            return run_job(ctx)

        crashing_run_job.crashes = True
        pipeline.run_job = crashing_run_job
