"""Shared fixtures: a real redis-server the tests own, SQLite files, PostgreSQL when reachable.

Tests never reach a model hub (HF_HUB_OFFLINE) and never use the developer's Redis on
6379: `redis_server` starts its own on a free port and can be stopped and restarted by
fault-injection tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The fault-injection scenarios' figures, summed up at the end of the run.
pytest_plugins = ("tests.faults_report",)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Settings a developer exported must not leak into the tests' databases or broker.
for _var in ("GRAFTQ_DATABASE_URL", "GRAFTQ_BROKER_URL", "GRAFTQ_ARTIFACTS_DIR", "GRAFTQ_QUEUE",
             "GRAFTQ_STALE_AFTER", "GRAFTQ_HEARTBEAT_INTERVAL", "GRAFTQ_MAX_ATTEMPTS",
             "GRAFTQ_VISIBILITY_TIMEOUT"):
    os.environ.pop(_var, None)

from tests.redis_server import QUEUE_KEYS, RedisServer, free_port  # noqa: E402,F401 - re-exported


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this test session (empty queues are the test's business: see `redis_url`)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server); queue tests need it")
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, running and emptied for this test."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: on a machine busier than its cores (as `make test` keeps it),
    OpenMP teams wait for each other on every tiny matmul, and generation slows a hundredfold."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'graftq.db'}"


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture
def graftq_env(sqlite_url: str, artifacts_dir: Path) -> dict[str, str]:
    """Environment for `graftq` subprocesses: this test's database and artifacts, repo importable."""
    env = dict(os.environ)
    env.update(GRAFTQ_DATABASE_URL=sqlite_url, GRAFTQ_ARTIFACTS_DIR=str(artifacts_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A tiny JSONL training set: reverse three letters."""
    import json

    path = tmp_path / "data" / "reverse.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    words = ["abc", "xyz", "cat", "dog", "sun", "map", "red", "fox", "owl", "bee", "ink", "jar"]
    path.write_text("".join(json.dumps({"input": w, "target": w[::-1]}) + "\n" for w in words * 3))
    return path


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL URL (GRAFTQ_TEST_POSTGRES_URL); the test is skipped, with why, when unreachable."""
    url = os.environ.get("GRAFTQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # any failure to connect means: no server for this run
        pytest.skip(f"PostgreSQL not reachable at {url} (set GRAFTQ_TEST_POSTGRES_URL): {error}".splitlines()[0])
    return url


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database of this test's own, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text

    from db.session import clear_cache

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"graftq_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        clear_cache()  # engines of this process that point at the database
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def graftq_argv(*args: str) -> list[str]:
    """argv that runs the graftq CLI from this checkout, installed or not."""
    return [sys.executable, "-m", "jobs.cli", *args]


class WorkerProcess:
    """A real `graftq worker` subprocess (a process group of its own) for a `with` block.

        with WorkerProcess(env, "--gpus", "none") as worker:
            worker.wait_for(lambda: all_done(), timeout=180, what="the batch to finish")
        worker.output  # everything it printed, once the block has stopped it (SIGTERM, then SIGKILL)
    """

    def __init__(self, env: dict[str, str], *args: str, cwd: Path = ROOT):
        self.process = subprocess.Popen(graftq_argv("worker", *args), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.output = ""

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.output, _ = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.output, _ = self.process.communicate()

    def wait_for(self, done: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll `done()` every second until it is true; fail if the worker exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not done():
            assert self.process.poll() is None, self.process.stdout.read()
            if time.monotonic() > deadline:
                pytest.fail(f"waited {timeout:.0f} s for {what}")
            time.sleep(1)


#: The longest test files, started first: `make test` hands whole files to two processes, and a long
#: file taken last would leave one process running it alone at the end.
LONGEST_FILES = ("test_faults.py", "test_readme.py", "test_distributed.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file's tests keep their order
