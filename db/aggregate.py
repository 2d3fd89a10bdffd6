"""Grouped results: `graftq results --group-by KEYS --agg FIELD:AGG[,AGG...]`.

Computed in Python over the rows `db.queries.result_rows` returns, so SQLite and PostgreSQL
give the same numbers. Aggregates ignore nulls: `count` is the number of non-null values,
`std` the sample standard deviation (n - 1; null for fewer than two values), and `mean`,
`min`, `max` are null for a group with no values. A group is one object: its keys (dotted
params keys as they are) and one `<field>_<agg>` per aggregate.

    groups = group_rows(rows, ["task", "lora.r"], parse_aggregates("eval_loss:mean,std"))
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from db.conditions import (
    COLUMN_KEYS,
    as_number,
    as_text,
    check_param_key,
    is_column,
    mapping_value,
    metric_name,
)
from db.tables import NUMERIC_FIELDS, RESULT_FIELDS

AGGREGATES: dict[str, Callable[[list[Any]], Any]] = {
    "mean": lambda values: statistics.fmean(values) if values else None,
    "std": lambda values: statistics.stdev(values) if len(values) >= 2 else None,
    "min": lambda values: min(values) if values else None,
    "max": lambda values: max(values) if values else None,
    "count": len,
}
#: The numeric result fields; any of them can be aggregated, and so can a task metric (`metric.<name>`).
AGGREGATABLE = tuple(name for name in RESULT_FIELDS if name in NUMERIC_FIELDS)
#: What `--group-by` aggregates when no `--agg` is given.
DEFAULT_AGGREGATES = "eval_loss:mean,std,min,count"


@dataclass(frozen=True)
class Aggregate:
    field: str
    function: str  # a key of AGGREGATES

    @property
    def column(self) -> str:
        return f"{self.field}_{self.function}"


def parse_aggregates(text: str) -> list[Aggregate]:
    """`FIELD:AGG[,AGG...]` as aggregates; raises ValueError naming the bad part and the choices."""
    field, colon, functions = text.partition(":")
    field = field.strip()
    if not colon or not functions.strip():
        raise ValueError(f"{text!r} is not FIELD:AGG[,AGG...]; e.g. eval_loss:mean,std,min,count")
    if field not in AGGREGATABLE and not metric_name(field):
        raise ValueError(f"cannot aggregate {field!r}: not a numeric result field; choose one of "
                         f"{', '.join(AGGREGATABLE)} or a task metric (e.g. metric.accuracy)")
    names = [name.strip() for name in functions.split(",")]
    unknown = [name for name in names if name not in AGGREGATES]
    if unknown:
        raise ValueError(f"unknown aggregate {unknown[0]!r} in {text!r}; choose from {', '.join(AGGREGATES)}")
    return [Aggregate(field, name) for name in dict.fromkeys(names)]


def parse_group_keys(text: str) -> list[str]:
    """A comma list of result fields and params keys; raises ValueError for one that is neither."""
    keys = [key.strip() for key in text.split(",") if key.strip()]
    if not keys:
        raise ValueError(f"{text!r} names no key; e.g. task,extension,lora.r")
    for key in keys:
        if not is_column(key):
            check_param_key(key)
    return list(dict.fromkeys(keys))


def key_value(row: Mapping[str, Any], key: str) -> Any:
    """A row's value for a result field, a params key or a task metric key (None when the job has none)."""
    if key in COLUMN_KEYS:
        return row.get(key)
    return mapping_value(row, key)


def order_key(value: Any) -> tuple[Any, ...]:
    """Sorts numbers (by value) before text before nulls; equal for values that group together."""
    if value is None:
        return (2,)
    number = as_number(value)
    return (0, number) if number is not None else (1, as_text(value))


def group_rows(rows: Iterable[Mapping[str, Any]], keys: Sequence[str],
               aggregates: Sequence[Aggregate]) -> list[dict[str, Any]]:
    """One dict per group (the keys' values, then each aggregate's), sorted by the keys, nulls last.

    Values that compare equal (`8` and `8.0`) fall in one group, shown as the first row's value.
    """
    groups: dict[tuple[Any, ...], tuple[list[Any], list[Mapping[str, Any]]]] = {}
    for row in rows:
        values = [key_value(row, key) for key in keys]
        identity = tuple(order_key(value) for value in values)
        groups.setdefault(identity, (values, []))[1].append(row)
    result = []
    for identity in sorted(groups):
        values, members = groups[identity]
        group = dict(zip(keys, values, strict=True))
        for aggregate in aggregates:
            present = [value for row in members if (value := key_value(row, aggregate.field)) is not None]
            group[aggregate.column] = AGGREGATES[aggregate.function](present)
        result.append(group)
    return result


def sort_groups(groups: list[dict[str, Any]], column: str, *, descending: bool = False) -> list[dict[str, Any]]:
    """`groups` sorted by one of their columns, nulls last in either direction (stable)."""
    present = [group for group in groups if group[column] is not None]
    missing = [group for group in groups if group[column] is None]
    return sorted(present, key=lambda group: order_key(group[column]), reverse=descending) + missing
