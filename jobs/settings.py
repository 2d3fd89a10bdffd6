"""Settings of the submitting side and the workers, from the environment (and CLI options).

| setting | environment variable | default |
|---|---|---|
| database_url | GRAFTQ_DATABASE_URL | sqlite:///graftq-data/graftq.db |
| broker_url | GRAFTQ_BROKER_URL | redis://127.0.0.1:6379/0 |
| artifacts_dir | GRAFTQ_ARTIFACTS_DIR | ./graftq-data/artifacts (or `s3://bucket/prefix`, below) |
| visibility_timeout | GRAFTQ_VISIBILITY_TIMEOUT | 3600 s (kombu's; not a lease, see docs/reliability.md) |
| heartbeat_interval | GRAFTQ_HEARTBEAT_INTERVAL | 10 s |
| stale_after | GRAFTQ_STALE_AFTER | 60 s without a heartbeat: the worker is taken for dead |
| max_attempts | GRAFTQ_MAX_ATTEMPTS | 3 |
| queue | GRAFTQ_QUEUE | graftq (also graftq.gpu, graftq.cpu) |

A `rediss://` broker URL is TLS with the server's certificate checked: its query may say
`ssl_cert_reqs=required` (the default), `ssl_ca_certs=<CA file>` (else the system's CAs) and
`ssl_certfile`/`ssl_keyfile` (a client certificate). `ssl_cert_reqs=none` or `optional`, which
would accept any server, is refused. A password goes in the URL: `rediss://:secret@host:6380/0`.

An artifacts directory `s3://bucket/prefix` is S3-compatible object storage (the `s3` extra):
the endpoint and credentials come from the usual AWS variables (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), and each host
stages and caches artifacts under GRAFTQ_ARTIFACTS_CACHE (default ./graftq-data/artifacts-cache).
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from db import DEFAULT_DATABASE_URL

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_ARTIFACTS_DIR = "graftq-data/artifacts"

#: setting -> environment variable
ENV_VARS = {
    "database_url": "GRAFTQ_DATABASE_URL",
    "broker_url": "GRAFTQ_BROKER_URL",
    "artifacts_dir": "GRAFTQ_ARTIFACTS_DIR",
    "visibility_timeout": "GRAFTQ_VISIBILITY_TIMEOUT",
    "heartbeat_interval": "GRAFTQ_HEARTBEAT_INTERVAL",
    "stale_after": "GRAFTQ_STALE_AFTER",
    "max_attempts": "GRAFTQ_MAX_ATTEMPTS",
    "queue": "GRAFTQ_QUEUE",
}


#: TLS options a `rediss://` URL may carry in its query (redis-py / kombu names).
BROKER_TLS_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS_ACCEPTED = {"required", "cert_required"}
_CERT_REQS_REFUSED = {"none", "cert_none", "optional", "cert_optional"}


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used; the message names it."""


class ObjectStoreDir(str):
    """An artifacts directory in S3-compatible object storage, `s3://bucket/prefix` (no trailing `/`);
    `/` joins a part as Path does."""

    def __truediv__(self, part: object) -> ObjectStoreDir:
        return ObjectStoreDir(f"{self}/{part}")

    @property
    def bucket(self) -> str:
        return self.removeprefix(OBJECT_STORE_SCHEME).split("/", 1)[0]


OBJECT_STORE_SCHEME = "s3://"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def artifacts_location(value: str | Path) -> Path | ObjectStoreDir:
    """An absolute local Path, or an ObjectStoreDir for `s3://bucket[/prefix]`.

    Raises SettingsError for an `s3://` URL without a valid bucket name, or with `..` in its prefix.
    """
    text = str(value)
    if not text.startswith(OBJECT_STORE_SCHEME):
        return Path(value).expanduser().absolute()
    parts = [part for part in text.removeprefix(OBJECT_STORE_SCHEME).split("/") if part]
    if not parts or not _BUCKET_RE.fullmatch(parts[0]):
        raise SettingsError(f"GRAFTQ_ARTIFACTS_DIR={text!r}: expected s3://BUCKET/PREFIX with a bucket name of "
                            "3-63 lowercase letters, digits, `.` or `-`")
    if any(part in (".", "..") for part in parts):
        raise SettingsError(f"GRAFTQ_ARTIFACTS_DIR={text!r}: the prefix may not contain `.` or `..` parts")
    return ObjectStoreDir(OBJECT_STORE_SCHEME + "/".join(parts))


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts._replace(query=""))


def broker_tls(broker_url: str) -> tuple[str, dict[str, Any] | None]:
    """Split a broker URL into (URL without TLS options, TLS options for Celery's `broker_use_ssl`).

    For `redis://` and other schemes the options are None. For `rediss://` they always
    include `ssl_cert_reqs=ssl.CERT_REQUIRED` (kombu would otherwise fall back to not
    checking the certificate at all). Raises SettingsError for a TLS URL that would not verify
    the server, an unknown `ssl_*` option, or a certificate file that does not exist.
    """
    parts = urlsplit(broker_url)
    if parts.scheme != "rediss":
        return broker_url, None
    shown = _redacted(broker_url)
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    kept = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "ssl_cert_reqs":
            wanted = value.strip().lower()
            if wanted in _CERT_REQS_REFUSED:
                raise SettingsError(
                    f"GRAFTQ_BROKER_URL ({shown}) says ssl_cert_reqs={value}: the Redis server's certificate would "
                    "not be checked, so anyone on the path could read and change jobs. Use ssl_cert_reqs=required "
                    "with ssl_ca_certs=<the CA file that signed the server's certificate>"
                )
            if wanted not in _CERT_REQS_ACCEPTED:
                raise SettingsError(f"GRAFTQ_BROKER_URL ({shown}): ssl_cert_reqs={value!r} is not `required`")
        elif key in BROKER_TLS_KEYS:
            path = Path(value).expanduser()
            if not path.is_file():
                raise SettingsError(f"GRAFTQ_BROKER_URL ({shown}): {key}={value} is not a file")
            options[key] = str(path)
        elif key.startswith("ssl_"):
            raise SettingsError(
                f"GRAFTQ_BROKER_URL ({shown}): unknown TLS option {key!r}; graftq understands "
                f"{', '.join(BROKER_TLS_KEYS)}"
            )
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), options


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    #: a local directory, or `s3://bucket/prefix` (an ObjectStoreDir)
    artifacts_dir: Path | ObjectStoreDir = Path(DEFAULT_ARTIFACTS_DIR)
    visibility_timeout: float = 3600.0
    heartbeat_interval: float = 10.0
    stale_after: float = 60.0
    max_attempts: int = 3
    queue: str = "graftq"

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifacts_dir", artifacts_location(self.artifacts_dir))
        if self.heartbeat_interval <= 0 or self.stale_after <= 0 or self.visibility_timeout <= 0:
            raise SettingsError("heartbeat_interval, stale_after and visibility_timeout must be > 0")
        if self.stale_after < 2 * self.heartbeat_interval:
            raise SettingsError(
                f"stale_after ({self.stale_after:g} s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval:g} s), or live workers would be taken for dead"
            )
        if self.max_attempts < 1:
            raise SettingsError("max_attempts must be >= 1")
        broker_tls(self.broker_url)  # a TLS URL that would not check the server is refused up front

    @property
    def gpu_queue(self) -> str:
        return f"{self.queue}.gpu"

    @property
    def cpu_queue(self) -> str:
        return f"{self.queue}.cpu"

    @property
    def queues(self) -> tuple[str, str, str]:
        return (self.queue, self.gpu_queue, self.cpu_queue)

    def queue_for(self, queue_kind: str) -> str:
        """The queue of a job whose spec says `queue_kind` (`gpu`, `cpu` or `any`)."""
        return {"gpu": self.gpu_queue, "cpu": self.cpu_queue}.get(queue_kind, self.queue)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from GRAFTQ_* variables; `overrides` that are not None win (CLI options)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, var in ENV_VARS.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            kind = types[name]
            try:
                values[name] = float(raw) if kind == "float" else int(raw) if kind == "int" else raw
            except ValueError:
                raise SettingsError(f"{var}={raw!r} is not a number") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process."""
        return {var: str(getattr(self, name)) for name, var in ENV_VARS.items()}
