"""Batch files: load the YAML, merge `defaults` into every job, validate the whole batch.

    batch = load_batch(Path("experiments.yaml"))   # raises SpecError listing every problem
    for spec in batch.jobs: ...                     # validated JobSpecs

Nothing is written anywhere here: a batch is either valid as a whole, or `SpecError`
lists one line per problem, each naming the job (index and task) and the key.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import gc
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.errors import SpecError, describe_validation_error
from jobs.spec import JobSpec

TOP_LEVEL_KEYS = ("batch", "base_model", "defaults", "jobs")
DATASET_SUFFIXES = (".jsonl", ".json", ".csv")
REQUIRED_COLUMNS = ("input", "target")
MAX_BATCH_NAME = 200


@dataclass(frozen=True)
class Batch:
    """A validated batch: its name, the file it came from, and one JobSpec per job.

    `params` and `needs` run parallel to `jobs` (empty lists mean none for every job).
    """

    name: str
    source: Path | None
    base_model: str | None
    jobs: list[JobSpec]
    #: per job: the `matrix`/`sample` values that made it (dotted key -> value); {} for a job written out
    params: list[dict[str, Any]] = field(default_factory=list)
    #: per job: what it waits for: positions in `jobs`, or ids (str) of jobs recorded earlier
    needs: list[list[int | str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.params:
            object.__setattr__(self, "params", [{} for _ in self.jobs])
        if not self.needs:
            object.__setattr__(self, "needs", [[] for _ in self.jobs])


_SCALARS = (str, int, float, bool, type(None))


def _copy(value: Any) -> Any:
    # Scalars are immutable: skipping deepcopy for them is most of the merge's cost on big batches.
    return value if isinstance(value, _SCALARS) else copy.deepcopy(value)


def deep_merge(defaults: Mapping[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` with `job` merged over it; nested mappings merge key by key, job keys win.

    The result shares no mutable value with either argument.
    """
    merged = {key: _copy(value) for key, value in defaults.items()}
    for key, value in job.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = _copy(value)
    return merged


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector for a bounded burst of allocations.

    Loading and recording a big batch allocates hundreds of thousands of objects that live
    on (YAML nodes, job dicts, specs, rows); each allocation threshold reached makes the
    collector walk them all again, a measurable share of `graftq submit` on a 10,000-job
    batch (benchmarks/README.md, `submission`). Reference counting still frees everything
    acyclic; the collector runs again when the block ends. Nested use is fine: only the
    outermost block re-enables it. Also a decorator (`@gc_paused()`), for functions that do
    such a burst.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _suggest(key: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    return f"; did you mean `{close[0]}`?" if close else f"; allowed: {', '.join(choices)}"


def _job_label(index: int, raw: Any) -> str:
    task = raw.get("task") if isinstance(raw, Mapping) else None
    if isinstance(task, str):
        shown = task if len(task) <= 40 else task[:37] + "..."
        return f"job {index} (task {shown!r})"
    return f"job {index}"


def check_dataset(path: Path) -> str | None:
    """Why `path` cannot serve as a training dataset, or None if it looks usable.

    Checks existence, the suffix, and the `input`/`target` columns from the first JSONL
    record or the CSV header (cheap: the file is not read further).
    """
    if not path.exists():
        return f"dataset file {str(path)!r} does not exist (relative paths are resolved against the batch file)"
    if not path.is_file():
        return f"dataset {str(path)!r} is not a file"
    suffix = path.suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        return f"dataset {str(path)!r} must be JSONL (.jsonl) or CSV (.csv) with columns input,target"
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix == ".csv":
                header = next(csv.reader(handle), None)
                columns = [c.strip() for c in header] if header else []
            else:
                first = next((line for line in handle if line.strip()), None)
                if first is None:
                    return f"dataset {str(path)!r} is empty"
                record = json.loads(first)
                if not isinstance(record, dict):
                    return f"dataset {str(path)!r}: each line must be a JSON object with input and target"
                columns = list(record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        return f"dataset {str(path)!r} cannot be read: {error}"
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        found = ", ".join(map(str, columns[:10])) or "none"
        return (f"dataset {str(path)!r} has no {' or '.join(missing)} column (found: {found}); "
                "each record needs `input` and `target`")
    return None


def parse_batch(data: Any, source: Path | None = None) -> Batch:
    """Validate a loaded batch document; raises SpecError with every problem found."""
    where = "batch file"
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: the top level must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    problems: list[str] = []
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"{where}: key `{key}`: unknown top-level key{_suggest(key, TOP_LEVEL_KEYS)}")

    name = data.get("batch")
    if name is None:
        name = source.stem if source is not None else "batch"
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_BATCH_NAME:
        problems.append(f"{where}: key `batch`: must be a non-empty name of at most {MAX_BATCH_NAME} characters")
        name = "batch"

    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        problems.append(f"{where}: key `base_model`: must be a string (hub id, directory or random:<preset>)")
        base_model = None

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        problems.append(f"{where}: key `defaults`: must be a mapping of job keys (lora, layer, train, ...)")
        defaults = {}
    elif "task" in defaults:
        problems.append(f"{where}: key `defaults.task`: every job names its own task; remove it from defaults")

    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        problems.append(f"{where}: key `jobs`: must be a non-empty list of jobs (each with at least `task`)")
        raw_jobs = []

    base_dir = source.parent if source is not None else Path.cwd()
    dataset_checks: dict[Path, str | None] = {}
    resolved: dict[str, str] = {}  # the same dataset string usually comes from `defaults`
    specs: list[JobSpec] = []
    for index, raw in enumerate(raw_jobs):
        label = _job_label(index, raw)
        if not isinstance(raw, Mapping):
            problems.append(f"{label}: must be a mapping such as {{task: reverse, extension: lora}}")
            continue
        merged = deep_merge(defaults, raw)
        if base_model is not None:
            merged.setdefault("base_model", base_model)
        train = merged.get("train")
        if isinstance(train, Mapping) and isinstance(train.get("dataset"), str):
            raw_dataset = train["dataset"]
            if raw_dataset not in resolved:
                dataset = Path(raw_dataset).expanduser()
                resolved[raw_dataset] = str((dataset if dataset.is_absolute() else base_dir / dataset).resolve())
            merged["train"] = {**train, "dataset": resolved[raw_dataset]}
        try:
            spec = JobSpec.model_validate(merged)
        except ValidationError as error:
            problems.extend(describe_validation_error(error, where=label))
            continue
        if spec.train is not None:
            dataset = Path(spec.train.dataset)
            if dataset not in dataset_checks:
                dataset_checks[dataset] = check_dataset(dataset)
            if dataset_checks[dataset] is not None:
                problems.append(f"{label}: key `train.dataset`: {dataset_checks[dataset]}")
                continue
        specs.append(spec)

    if problems:
        count = len(problems)
        raise SpecError(f"{count} problem{'s' if count > 1 else ''} in the batch file", problems)
    return Batch(name=name, source=source, base_model=base_model, jobs=specs)


@gc_paused()
def load_batch(path: Path) -> Batch:
    """Read and validate a batch file; raises SpecError (nothing else) for any user mistake."""
    path = Path(path).expanduser().absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"batch file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"batch file {str(path)!r} cannot be read: {error}") from None
    # libyaml's loader when PyYAML was built with it: ~3x faster on batches of thousands of jobs.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as error:
        raise SpecError(f"batch file {str(path)!r} is not valid YAML: {error}") from None
    return parse_batch(data, source=path)
