"""`graftq results --where` conditions: `KEY OP VALUE` on a result field, a `params` key or a
task metric (`metric.<name>`, a key of the `metrics` field).

A condition on a result field becomes SQL; one on a params key (`lora.r`, a matrix value) or a
metric is checked in Python on the fetched rows, so SQLite and PostgreSQL give the same rows
whatever the JSON types. A job with no value for the key (null, no such param or metric) never
matches.

    condition = Condition.parse("train.learning_rate<0.001")
    condition.matches(row)
"""

from __future__ import annotations

import datetime as dt
import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement

from db.tables import FIELDS, NUMERIC_FIELDS, RESULT_FIELDS, JobStatus, UTCDateTime, batches, jobs

OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
#: Result fields a condition or a group can name (`params` and `metrics` are mappings: their keys are
#: named instead).
COLUMN_KEYS = tuple(name for name in RESULT_FIELDS if name not in ("params", "metrics"))
#: `metric.accuracy` names the task metric `accuracy` (a key of the `metrics` field).
METRIC_PREFIX = "metric."
TIME_FIELDS = frozenset(field.name for field in FIELDS if field.type is UTCDateTime)
PARAM_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_CONDITION_RE = re.compile(r"^\s*([^\s<>=!]+)\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*$")
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

WHERE_HELP = ("KEY OP VALUE, OP one of = != < <= > >=; KEY a result field (e.g. status, task, eval_loss), a "
              "params key (e.g. lora.r) or a task metric (e.g. metric.accuracy)")


def as_number(value: Any) -> float | None:
    """`value` as a number when it is one (an int, a float, or a string spelling a number), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        return float(value)
    return None


def as_text(value: Any) -> str:
    """How a params value compares as a string: a string as it is, anything else as JSON (`true`, `[4, 8]`)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def is_column(key: str) -> bool:
    return key in COLUMN_KEYS


def metric_name(key: str) -> str | None:
    """The task metric that `key` names (`metric.accuracy` -> `accuracy`), or None for another key."""
    return key[len(METRIC_PREFIX):] if key.startswith(METRIC_PREFIX) else None


def mapping_value(row: Mapping[str, Any], key: str) -> Any:
    """A row's value for a task metric key or a params key (None when the job has none)."""
    name = metric_name(key)
    found = row.get("metrics") if name is not None else row.get("params")
    return found.get(key if name is None else name) if isinstance(found, Mapping) else None


def check_param_key(key: str) -> None:
    """Raise ValueError unless `key` can be a params key (a dotted spec path such as `lora.r`) or a
    task metric key (`metric.<name>`)."""
    if key in ("params", "metrics"):
        raise ValueError(f"name one key of {key} (e.g. {'lora.r' if key == 'params' else 'metric.accuracy'}), "
                         f"not `{key}` itself")
    if metric_name(key) == "":
        raise ValueError("name a task metric after `metric.`, e.g. metric.accuracy")
    if not PARAM_KEY_RE.match(key):
        raise ValueError(f"{key!r} is neither a result field nor a params key (letters, digits, '_', '-' and "
                         f"dots, e.g. lora.r); result fields: {', '.join(COLUMN_KEYS)}")


@dataclass(frozen=True)
class Condition:
    """One `--where` condition. `value` is the text after the operator; for a result field,
    `column_value` is it converted to the field's type."""

    key: str
    op: str
    value: str
    column_value: Any = None

    @classmethod
    def parse(cls, text: str) -> Condition:
        """Parse `KEY OP VALUE`; raises ValueError naming what is wrong and the form it takes."""
        match = _CONDITION_RE.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a condition; write {WHERE_HELP}, e.g. lora.r=8 or status!=failed")
        key, op, value = match.groups()
        op = "=" if op == "==" else op
        if value == "":
            raise ValueError(f"{text!r} has no value after {op!r}; write e.g. {key}{op}8")
        if not is_column(key):
            check_param_key(key)
            return cls(key, op, value)
        return cls(key, op, value, _column_value(key, value))

    @property
    def on_column(self) -> bool:
        return is_column(self.key)

    def clause(self, dialect: str) -> ColumnElement[bool]:
        """The SQL condition of a condition on a result field."""
        column: Any = batches.c.name if self.key == "batch" else jobs.c[self.key]
        if isinstance(self.column_value, str) and self.op not in ("=", "!="):
            # PostgreSQL orders text by the database's locale; "C" orders by code point, as SQLite does.
            column = column.collate("C") if dialect == "postgresql" else column
        return OPERATORS[self.op](column, self.column_value)

    def matches(self, row: Mapping[str, Any]) -> bool:
        """Whether a result row satisfies a condition on a params key or a task metric."""
        found = mapping_value(row, self.key)
        if found is None:
            return False
        number, wanted = as_number(found), as_number(self.value)
        if number is not None and wanted is not None:
            return bool(OPERATORS[self.op](number, wanted))
        return bool(OPERATORS[self.op](as_text(found), self.value))


def _column_value(key: str, value: str) -> Any:
    if key in NUMERIC_FIELDS:
        number = as_number(value)
        if number is None:
            raise ValueError(f"{key} is a number; {value!r} is not one (e.g. {key}<0.5)")
        return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+", value) else number
    if key in TIME_FIELDS:
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{key} is a time; {value!r} is not an ISO date or time (e.g. {key}>=2026-11-29 or "
                             f"{key}>=2026-11-29T14:00)") from None
        return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when
    if key == "status" and value not in {status.value for status in JobStatus}:
        raise ValueError(f"{value!r} is not a status; statuses: {', '.join(status.value for status in JobStatus)}")
    return value
