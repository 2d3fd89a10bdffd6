"""What every benchmark shares: result records, timing statistics, a private redis-server,
a private SQLite database, and the command line (`--quick`, `--json PATH`).

A benchmark script defines `run(quick: bool) -> Result` and ends with
`raise SystemExit(main(NAME, run))`. `run_all.py` starts each script in its own process, so
that one benchmark's imports and memory never colour another's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: the repo's packages come from here
    sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer  # noqa: E402 - after the path set-up above

BENCH_DIR = ROOT / "benchmarks"
EXAMPLES = ROOT / "examples" / "data"

# Benchmarks never reach a model hub and never read a developer's graftq settings.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
for _var in ("GRAFTQ_DATABASE_URL", "GRAFTQ_BROKER_URL", "GRAFTQ_ARTIFACTS_DIR", "GRAFTQ_QUEUE"):
    os.environ.pop(_var, None)


@dataclass
class Check:
    """One figure held against its target: `value` (and `ratio` to a reference where there is one)."""

    what: str
    value: float
    unit: str
    target: str
    passed: bool
    reference: float | None = None
    ratio: float | None = None

    def line(self) -> str:
        text = f"{self.what}: {fmt(self.value)} {self.unit}"
        if self.reference is not None:
            text += f" | reference {fmt(self.reference)} {self.unit}"
        if self.ratio is not None:
            text += f" | ratio {self.ratio:.3f}"
        return f"  [{'PASS' if self.passed else 'FAIL'}] {text} | target {self.target}"


@dataclass
class Result:
    name: str
    description: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(check.passed for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def print(self) -> None:
        print(f"== {self.name}: {self.description}")
        for key, value in self.figures.items():
            print(f"  {key}: {fmt(value)}")
        for check in self.checks:
            print(check.line())
        for note in self.notes:
            print(f"  note: {note}")
        if self.error:
            print(f"  ERROR: {self.error}")
        print(f"  -> {'PASS' if self.passed else 'FAIL'} ({self.seconds:.1f} s)", flush=True)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.001 <= abs(value) < 100_000:
            return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
        return f"{value:.3e}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, Any]:
    """Where the figures were taken; the load average shows how busy the shared machine was."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()}
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def rss_mb() -> float:
    """Resident set size of this process now, in MB (2**20 bytes)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- subprocesses -------------------------------------------------------------------------------
def graftq_env(**settings: str) -> dict[str, str]:
    """Environment for `graftq` subprocesses: this checkout importable, the venv's scripts first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(settings)
    return env


def graftq_argv(*args: str) -> list[str]:
    """argv that runs the installed `graftq` console script (what a user types)."""
    script = Path(sys.executable).parent / "graftq"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "jobs.cli", *args]


def time_command(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of one subprocess, start to exit."""
    started = time.perf_counter()
    completed = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if check and completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {completed.returncode}:\n"
                           f"{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}")
    return seconds, completed


# -- a private redis-server and SQLite file -----------------------------------------------------
@contextmanager
def workspace(prefix: str) -> Iterator[Path]:
    """A temporary directory for this benchmark's database, artifacts and broker; removed after."""
    directory = Path(tempfile.mkdtemp(prefix=f"graftq-bench-{prefix}-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'graftq.db'}"


# -- the command line -------------------------------------------------------------------------
def compile_graftq() -> None:
    """Byte-compile graftq's own packages, as pip does when it installs a package.

    An editable install leaves them as source, and where PYTHONDONTWRITEBYTECODE is set (it is
    on these machines) every `graftq` command would compile them again at start (~0.1 s of a
    `graftq submit`), which a user's installed graftq does not pay. Only changed files compile.
    """
    import compileall

    for package in ("jobs", "db", "worker"):
        compileall.compile_dir(str(ROOT / package), quiet=1)


def main(name: str, run: Callable[[bool], Result], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"graftq benchmark: {name}")
    parser.add_argument("--quick", action="store_true", help="reduced sizes: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    compile_graftq()
    started = time.perf_counter()
    try:
        result = run(args.quick)
    except Exception as error:  # a broken benchmark still reports, and run_all goes on
        import traceback

        traceback.print_exc()
        result = Result(name=name, description="(did not complete)", error=f"{type(error).__name__}: {error}")
    result.seconds = time.perf_counter() - started
    result.figures.setdefault("machine", machine())
    result.print()
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2, default=str))
    return 0 if result.passed else 1


# -- queue-side helpers ---------------------------------------------------------------------------
def write_batch(path: Path, name: str, jobs: list[dict[str, Any]], base_model: str = "random:t5-tiny",
                defaults: dict[str, Any] | None = None) -> Path:
    """Write a batch file (flow-style YAML, one job a line) and return its path."""
    lines = [f"batch: {name}", f"base_model: {base_model}"]
    if defaults:
        lines.append(f"defaults: {json.dumps(defaults)}")
    lines.append("jobs:")
    lines += [f"  - {json.dumps(job)}" for job in jobs]
    path.write_text("\n".join(lines) + "\n")
    return path


def submit(env: dict[str, str], batch_file: Path) -> tuple[float, str]:
    """`graftq submit BATCH`: (wall seconds, batch id)."""
    seconds, completed = time_command(graftq_argv("submit", str(batch_file)), env=env)
    return seconds, completed.stdout.strip().splitlines()[-1]


class Worker:
    """`graftq worker --gpus none` as a user starts it, in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(graftq_argv("worker", "--gpus", "none", "--reap-interval", "0",
                                                    "--loglevel", "WARNING"),
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def stop(self) -> None:
        import signal

        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


def wait_for_batch(database_url: str, batch_id: str, expected: int, timeout: float,
                   worker: Worker | None = None, poll: float = 0.25) -> None:
    """Poll the results database until every job of the batch has finished."""
    from sqlalchemy import func, select

    from db.session import get_database
    from db.tables import jobs

    database = get_database(database_url)
    deadline = time.monotonic() + timeout
    done_states = ("succeeded", "failed", "cancelled")
    while time.monotonic() < deadline:
        with database.read() as session:
            done = session.scalar(select(func.count()).select_from(jobs).where(
                jobs.c.batch_id == batch_id, jobs.c.status.in_(done_states)))
        if done >= expected:
            return
        if worker is not None and worker.process is not None and worker.process.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.process.returncode}:\n{worker.tail()}")
        time.sleep(poll)
    raise RuntimeError(f"batch {batch_id}: not finished within {timeout:.0f} s"
                       + (f"\nworker log:\n{worker.tail()}" if worker else ""))


def populate(database_url: str, jobs: int, batches: int = 10, chunk: int = 10_000) -> None:
    """Insert `jobs` finished jobs (varied statuses, kinds and metrics) straight into db.tables.

    Bulk inserts through SQLAlchemy: the figures of the results benchmarks are about reading,
    so the rows are written the fast way rather than by running jobs.
    """
    import datetime as dt
    import random

    from sqlalchemy import insert

    from db import tables
    from db.session import get_database

    database = get_database(database_url)
    rng = random.Random(0)
    now = dt.datetime.now(dt.UTC)
    kinds = ["lora", "layer", "hybrid"]
    statuses = ["succeeded"] * 8 + ["failed", "queued"]
    batch_ids = [f"{index:016x}" for index in range(batches)]
    with database.begin() as session:
        session.execute(insert(tables.batches), [{"id": batch_id, "name": f"bench-{index}", "created_at": now}
                                        for index, batch_id in enumerate(batch_ids)])
    for start in range(0, jobs, chunk):
        rows = []
        for index in range(start, min(start + chunk, jobs)):
            extension = kinds[index % 3]
            status = statuses[index % len(statuses)]
            done = status == "succeeded"
            created = now - dt.timedelta(seconds=jobs - index)
            rows.append({
                "id": f"{index + 1:016x}", "batch_id": batch_ids[index % batches], "position": index,
                "task": f"task{index % 50}", "kind": "train", "extension": extension,
                "base_model": "random:t5-tiny", "requested_device": "cpu", "queue": "graftq.cpu",
                "spec": {"task": f"task{index % 50}", "kind": "train", "extension": extension},
                "status": status, "attempts": 1 if status != "queued" else 0, "max_attempts": 3,
                "cancel_requested": False, "created_at": created,
                "started_at": created if status != "queued" else None,
                "finished_at": created + dt.timedelta(seconds=5) if status != "queued" else None,
                "device": "cpu", "dtype": "float32", "worker": "bench@host:1",
                "base_params": 1_000_000, "total_params": 1_010_000, "trainable_params": 10_000,
                "lora_params": 10_000, "layer_params": 0, "trainable_pct": 1.0,
                "train_loss": rng.uniform(0.1, 5) if done else None,
                "eval_loss": rng.uniform(0.1, 5) if done else None, "steps": 100 if done else None,
                "tokens_per_second": rng.uniform(1e3, 1e4) if done else None,
                "train_seconds": rng.uniform(1, 60) if done else None,
                "peak_memory_mb": rng.uniform(300, 400) if done else None,
                "error": "JobError: bench" if status == "failed" else None,
            })
        with database.begin() as session:
            session.execute(insert(tables.jobs), rows)


def collated_batches(train: dict[str, Any], steps: int, tokenizer: Any = None,
                     task_type: str = "seq2seq") -> list[dict[str, Any]]:
    """The batches graftq's trainer draws for `train` settings, tokenised and collated up front.

    The same dataset reading, held-out split and seeded step order as `worker.training`, so a
    hand-written loop (or a FLOP count) sees exactly what a graftq job trains on.
    """
    from worker.data import StepBatches, collate, read_rows, split, tokenize
    from worker.tokenizer import ByteTokenizer

    tokenizer = tokenizer or ByteTokenizer()
    examples = tokenize(read_rows(train["dataset"]), tokenizer, task_type, train["max_length"])
    train_set, _ = split(examples, train["eval_fraction"], train["seed"])
    batches = StepBatches(train_set, train["batch_size"], train["seed"])
    return [collate(batches.batch(step), task_type, tokenizer.pad_token_id) for step in range(steps)]


MODULE_PROBE = """
import atexit, json, sys
@atexit.register
def _report():
    names = ("torch", "transformers", "peft", "celery", "kombu", "sqlalchemy")
    sys.stderr.write("\\nGRAFTQ_BENCH_MODULES " + json.dumps([n for n in names if n in sys.modules]) + "\\n")
sys.argv = ["graftq"] + sys.argv[1:]
from jobs.cli import main
main()
"""


def imported_modules(args: list[str], env: dict[str, str]) -> list[str]:
    """Which heavy modules a `graftq ARGS` run imported (the CLI run in a probe process)."""
    completed = subprocess.run([sys.executable, "-c", MODULE_PROBE, *args], env=env, capture_output=True,
                               text=True)
    for line in completed.stderr.splitlines():
        if line.startswith("GRAFTQ_BENCH_MODULES "):
            return json.loads(line.removeprefix("GRAFTQ_BENCH_MODULES "))
    raise RuntimeError(f"graftq {' '.join(args)} did not report its modules:\n{completed.stderr[-2000:]}")
