"""Errors of the submitting side. Every message names the job, the key and the fix."""

from __future__ import annotations

from pydantic import ValidationError


class GraftqError(Exception):
    """Base class of graftq's user-facing errors."""


class SpecError(GraftqError):
    """A job spec or batch file is invalid. `problems` lists one line per bad key."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def describe_validation_error(error: ValidationError, where: str = "") -> list[str]:
    """Turn a pydantic ValidationError into lines `<where>key `a.b`: message`."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(job)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling (see `graftq submit --help-keys`)"
        elif item["type"] == "missing":
            message = "required key is missing"
        prefix = f"{where}: " if where else ""
        lines.append(f"{prefix}key `{key}`: {message}")
    return lines
