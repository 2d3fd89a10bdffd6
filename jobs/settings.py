"""Settings of the submitting side and the workers, from the environment (and CLI options).

| setting | environment variable | default |
|---|---|---|
| database_url | GRAFTQ_DATABASE_URL | sqlite:///graftq-data/graftq.db |
| broker_url | GRAFTQ_BROKER_URL | redis://127.0.0.1:6379/0 |
| artifacts_dir | GRAFTQ_ARTIFACTS_DIR | ./graftq-data/artifacts |
| visibility_timeout | GRAFTQ_VISIBILITY_TIMEOUT | 3600 s (kombu's; not a lease, see RELIABILITY.md) |
| heartbeat_interval | GRAFTQ_HEARTBEAT_INTERVAL | 10 s |
| stale_after | GRAFTQ_STALE_AFTER | 60 s without a heartbeat: the worker is taken for dead |
| max_attempts | GRAFTQ_MAX_ATTEMPTS | 3 |
| queue | GRAFTQ_QUEUE | graftq (also graftq.gpu, graftq.cpu) |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    artifacts_dir: Path = Path(DEFAULT_ARTIFACTS_DIR)
    visibility_timeout: float = 3600.0
    heartbeat_interval: float = 10.0
    stale_after: float = 60.0
    max_attempts: int = 3
    queue: str = "graftq"

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifacts_dir", Path(self.artifacts_dir).expanduser().absolute())
        if self.heartbeat_interval <= 0 or self.stale_after <= 0 or self.visibility_timeout <= 0:
            raise SettingsError("heartbeat_interval, stale_after and visibility_timeout must be > 0")
        if self.stale_after < 2 * self.heartbeat_interval:
            raise SettingsError(
                f"stale_after ({self.stale_after:g} s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval:g} s), or live workers would be taken for dead"
            )
        if self.max_attempts < 1:
            raise SettingsError("max_attempts must be >= 1")

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
