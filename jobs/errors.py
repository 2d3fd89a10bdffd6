"""Errors of the submitting side. Every message names the job, the key and the fix."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError


class GraftqError(Exception):
    """Base class of graftq's user-facing errors."""


class SpecError(GraftqError):
    """A job spec or batch file is invalid. `problems` lists one line per bad key."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]

    def __str__(self) -> str:
        if self.problems == [self.args[0]]:
            return self.args[0]
        return "\n".join([f"{self.args[0]}:", *(f"  {line}" for line in self.problems)])


class BrokerUnavailable(GraftqError):
    """The message broker cannot be reached; nothing was enqueued (the message says what was kept)."""


# Parts of a pydantic error location that name a union member rather than a key.
_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none", "is-instance"}
# Error types whose message reads better with the offending value shown.
_SHOW_INPUT = ("_type", "_parsing", "enum", "literal_error", "greater_than", "less_than",
               "too_long", "too_short", "model_type")


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        part for part in loc
        if not (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part))
    )


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `loc` (a section such as `lora`, or one inside it such as
    `train.early_stopping`), for did-you-mean suggestions."""
    from typing import get_args

    from pydantic import BaseModel

    from jobs.spec import JobSpec

    model: Any = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        nested = [arg for arg in (field.annotation, *get_args(field.annotation)) if field is not None
                  and isinstance(arg, type) and issubclass(arg, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_validation_error(error: ValidationError, where: str = "") -> list[str]:
    """Turn a pydantic ValidationError into lines `<where>: key `a.b`: message (got X)`.

    Union members' errors for one key are joined into one line; unknown keys get a
    did-you-mean suggestion from the spec's field names.
    """
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for item in error.errors():
        grouped.setdefault(_clean_loc(tuple(item["loc"])), []).append(item)

    lines = []
    prefix = f"{where}: " if where else ""
    for loc, items in grouped.items():
        key = ".".join(str(part) for part in loc) or "(job)"
        first = items[0]
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"allowed keys: {', '.join(allowed)}"
            message = f"unknown key; remove it or fix its spelling ({hint})"
        elif first["type"] == "missing":
            message = "required key is missing"
        elif first["type"] == "model_type":
            message = f"must be a mapping of {loc[-1]} settings (got {_shown(first.get('input'))})"
        else:
            messages = []
            for item in items:
                text = item["msg"].removeprefix("Value error, ")
                if text not in messages:
                    messages.append(text)
            message = " or ".join(messages) if len(messages) > 1 else messages[0]
            if any(first["type"].endswith(t) or first["type"] == t for t in _SHOW_INPUT) and "input" in first:
                shown = _shown(first["input"])
                if shown not in message:
                    message += f" (got {shown})"
        lines.append(f"{prefix}key `{key}`: {message}")
    return lines


class Problems:
    """The problem lines of a batch, in the order found. A problem shared by several jobs of one
    job entry (a matrix repeats a typo in every job it makes) is one line that counts the others."""

    def __init__(self) -> None:
        self._found: dict[tuple[Any, str], list[Any]] = {}

    def add(self, label: str, message: str, group: Any = None, *, once: bool = False) -> None:
        """Record `<label>: <message>`. Lines with the same message and `group` (not None) merge into
        the first, which counts the others, or, with `once`, drops them."""
        key = (object() if group is None else group, message)
        if key not in self._found:
            self._found[key] = [label, 1]
        elif not once:
            self._found[key][1] += 1

    def lines(self) -> list[str]:
        shown = []
        for (_, message), (label, count) in self._found.items():
            line = f"{label}: {message}" if label else message
            if count > 1:
                line += f" (and {count - 1} more job{'s' if count > 2 else ''} of the same job entry)"
            shown.append(line)
        return shown

    def __len__(self) -> int:
        return len(self._found)

    def raise_if_any(self) -> None:
        """Raise SpecError listing every line, if there is one."""
        if self._found:
            count = len(self._found)
            raise SpecError(f"{count} problem{'s' if count > 1 else ''} in the batch file", self.lines())
