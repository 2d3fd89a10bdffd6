"""A redis-server process of its own, on a free port (never the shared 6379).

Used by the test suite (which also stops, kills and restarts it) and by the benchmarks.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

QUEUE_KEYS = ("graftq", "graftq.gpu", "graftq.cpu")


def priority_keys(queue: str) -> list[str]:
    """The Redis lists that hold one queue's messages: kombu keeps one per message priority (a job
    of graftq priority 0, the default, is in the last one)."""
    from jobs.celery_app import REDIS_PRIORITY_SEP, REDIS_PRIORITY_STEPS

    return [queue, *(f"{queue}{REDIS_PRIORITY_SEP}{step}" for step in REDIS_PRIORITY_STEPS if step)]


def queued_messages(client, queue: str) -> list[bytes]:  # noqa: ANN001 - a redis.Redis
    """The raw messages waiting in `queue`, in the order a worker takes them."""
    return [message for key in priority_keys(queue) for message in reversed(client.lrange(key, 0, -1))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server process owned by the test session: `.url`, `.stop()`, `.start()`."""

    def __init__(self, directory: Path, port: int | None = None, binary: str | None = None):
        self.directory = directory
        self.port = port or free_port()
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # noqa: ANN201 - redis.Redis, imported lazily
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)

    def start(self, *, appendonly: bool = False, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if not Path(self.binary).exists():
            raise RuntimeError("redis-server is not installed (e.g. apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--dir", str(self.directory), *self.extra_args]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}: {argv}")
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def queue_lengths(self) -> dict[str, int]:
        client = self.client()
        return {queue: sum(client.llen(key) for key in priority_keys(queue)) for queue in QUEUE_KEYS}

    def flush(self) -> None:
        self.client().flushall()
