"""Test-only fault injection for `graftq worker` processes started by tests/test_faults.py.

Python imports `sitecustomize` at start-up from the PYTHONPATH; the fault tests put this
directory first on the workers' PYTHONPATH. Product code knows nothing of it.

GRAFTQ_TEST_CRASH_TASK=<task name>: a worker process that runs a job with that task name dies
at once after claiming it, every time, of SIGKILL: as the kernel's OOM killer or a crash in
native code would end it (SIGKILL rather than SIGSEGV, which would leave a core file).

GRAFTQ_TEST_CRASH_AFTER_OUTCOME=<task name>: a worker process that recorded the success of a
job with that task name dies of SIGKILL right after the outcome's commit, before it publishes
the jobs that the success released (the reaper must publish them).
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


_CRASH_AFTER_OUTCOME = os.environ.get("GRAFTQ_TEST_CRASH_AFTER_OUTCOME")

if _CRASH_AFTER_OUTCOME:
    from celery.signals import task_prerun

    @task_prerun.connect
    def _crash_after_the_outcome(**_):
        import signal

        from worker import tasks

        publish = tasks._publish_released
        if getattr(publish, "crashes", False):
            return

        def crashing_publish(job):
            if job.claim.spec.get("task") == _CRASH_AFTER_OUTCOME:
                os.kill(os.getpid(), signal.SIGKILL)
            return publish(job)

        crashing_publish.crashes = True
        tasks._publish_released = crashing_publish
