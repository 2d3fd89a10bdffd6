"""Batch files: load the YAML, expand sweeps, merge `defaults` into every job, validate the whole batch.

    batch = load_batch(Path("experiments.yaml"))   # raises SpecError listing every problem
    for spec, params, needs in zip(batch.jobs, batch.params, batch.needs): ...
    for position in batch.order(): ...             # parents before the jobs that need them

A job entry with a `matrix` or `sample` (its own, or the batch file's) becomes one job per
combination (jobs/sweep.py); `name`, `needs` and the `from` keys become positions in
`Batch.jobs` (jobs/dependencies.py). Nothing is written anywhere here: a batch is either
valid as a whole, or `SpecError` lists one line per problem, each naming the job (its
position, and its matrix values or task) and the key.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import gc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.dependencies import Node, resolve_needs, topological_order
from jobs.errors import Problems, SpecError, describe_validation_error
from jobs.model_config import ModelConfigs, job_problems
from jobs.sources import HF_PREFIX, columns_of, hub_columns, missing_columns, parse_hub
from jobs.spec import MAX_PRIORITY, MIN_PRIORITY, JobSpec, as_source
from jobs.sweep import MAX_JOBS, Matrix, Sample, Sweep, SweepError, apply, describe, spec_paths

__all__ = ["MAX_JOBS", "Batch", "check_dataset", "deep_merge", "gc_paused", "load_batch", "parse_batch"]

TOP_LEVEL_KEYS = ("batch", "base_model", "priority", "defaults", "matrix", "sample", "jobs")
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
    #: the top-level `priority`: that of the jobs that set none (`graftq submit --priority` replaces it)
    priority: int | None = None

    def __post_init__(self) -> None:
        if not self.params:
            object.__setattr__(self, "params", [{} for _ in self.jobs])
        if not self.needs:
            object.__setattr__(self, "needs", [[] for _ in self.jobs])

    def priorities(self) -> list[int]:
        """Each job's priority: its own `priority`, else the batch's, else 0."""
        default = self.priority or 0
        return [default if spec.priority is None else spec.priority for spec in self.jobs]

    def order(self) -> list[int]:
        """The positions of `jobs`, each after every job of this batch it needs, otherwise by priority
        (highest first), then in batch order. Raises ValueError if the needs form a cycle (a validated
        batch never does)."""
        return topological_order(self.needs, self.priorities())


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


def _job_label(position: int, raw: Any, params: Mapping[str, Any] | None = None) -> str:
    """`job 7 (lora.r=16, train.learning_rate=0.003)` for a job a sweep made, else `job 3 (task 'x')`."""
    if params:
        return f"job {position} ({describe(params)})"
    task = raw.get("task") if isinstance(raw, Mapping) else None
    if isinstance(task, str):
        shown = task if len(task) <= 40 else task[:37] + "..."
        return f"job {position} (task {shown!r})"
    return f"job {position}"


def check_dataset(path: Path | str, split: str = "train", needed: Mapping[str, str] | None = None) -> str | None:
    """Why the source `path` (a file, a save_to_disk directory, `hf:NAME[:CONFIG]`) cannot serve as a
    training dataset, or None if it looks usable.

    `needed` maps graftq's columns to the source's (default: `input` and `target` as they are).
    Cheap, and never imports `datasets` (jobs/sources.py): a header, a first record, a schema, or
    the cache's JSON metadata; the worker reads the rows.
    """
    needed = dict(needed or {name: name for name in REQUIRED_COLUMNS})
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        try:
            ref = parse_hub(path)
        except ValueError as error:
            return str(error)
        columns, problem = hub_columns(ref, split)
        where = f"hub dataset {path!r}"
    else:
        columns, problem = columns_of(Path(path), split)
        where = f"dataset {str(path)!r}"
    if problem is not None or columns is None:
        return problem
    problem = missing_columns(columns, needed)
    return f"{where} {problem}" if problem else None


def format_problem(spec: JobSpec) -> str | None:
    """Why the job's `train.format` does not suit its model, when the model is known here (a preset)."""
    train = spec.train
    if train is None or train.format != "chat" or not spec.base_model.startswith("random:"):
        return None
    from jobs.presets import PRESETS

    task_type = PRESETS[spec.base_model.removeprefix("random:")]["task_type"]
    if task_type != "causal":
        return (f"chat needs a decoder-only (causal) model; {spec.base_model} is {task_type}: use format: text, "
                "or a causal base model such as random:llama-tiny")
    return None


@dataclass(frozen=True)
class _Entry:
    """One item of the file's `jobs` list, before its sweep is expanded."""

    index: int
    #: the job's own keys, `matrix` and `sample` taken out (or whatever stood there instead of a mapping)
    raw: Any
    sweep: Sweep = field(default_factory=Sweep)

    def label(self) -> str:
        task = self.raw.get("task") if isinstance(self.raw, Mapping) else None
        return f"job entry {self.index}" + (f" (task {task[:40]!r})" if isinstance(task, str) else "")

    def written_from(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Section -> the `from` this entry or its sweep values write (not one inherited from defaults)."""
        found = {}
        for section in ("layer", "lora"):
            for settings in (self.raw.get(section), params.get(section)):
                if isinstance(settings, Mapping):
                    value = settings.get("from", settings.get("from_"))
                    if value is not None:
                        found[section] = value
            value = params.get(f"{section}.from")
            if value is not None:
                found[section] = value
        return {section: value for section, value in found.items() if isinstance(value, str)}


class _Datasets:
    """The dataset paths of a batch: resolved against the batch file's directory, each file checked
    once (a grid repeats the same few files in every job)."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self._resolved: dict[str, str] = {}
        self._problems: dict[tuple, str | None] = {}

    def _path(self, raw: str) -> str:
        if raw.startswith(HF_PREFIX):
            return raw
        if raw not in self._resolved:
            dataset = Path(raw).expanduser()
            self._resolved[raw] = str((dataset if dataset.is_absolute() else self.base_dir / dataset).resolve())
        return self._resolved[raw]

    def _item(self, item: Any) -> Any:
        if isinstance(item, str):
            return self._path(item)
        if isinstance(item, Mapping) and isinstance(item.get("path"), str):
            return {**item, "path": self._path(item["path"])}
        return item

    def resolve(self, job: dict[str, Any]) -> None:
        """Make `train.dataset` (a source, or a list of them) absolute in the merged job mapping;
        `hf:` references stay as they are."""
        train = job.get("train")
        dataset = train.get("dataset") if isinstance(train, Mapping) else None
        if isinstance(dataset, str):
            job["train"] = {**train, "dataset": self._path(dataset)}
        elif isinstance(dataset, list):
            job["train"] = {**train, "dataset": [self._item(item) for item in dataset]}
        if isinstance(train, Mapping) and train.get("eval_dataset") is not None:
            job["train"] = {**job["train"], "eval_dataset": self._item(train["eval_dataset"])}
        sets = job["eval"].get("datasets") if isinstance(job.get("eval"), Mapping) else None
        if isinstance(sets, Mapping):
            job["eval"] = {**job["eval"], "datasets": {name: self._item(item) for name, item in sets.items()}}

    def _problem(self, source: Any, columns: tuple[str, ...]) -> str | None:
        needed = {name: source.columns.get(name, name) for name in columns}
        key = (source.path, source.split, tuple(sorted(needed.items())))
        if key not in self._problems:
            self._problems[key] = check_dataset(source.path, source.split, needed)
        return self._problems[key]

    def problem(self, spec: JobSpec) -> str | None:
        """Why one of the job's dataset sources cannot serve, or None."""
        train = spec.train
        for source in train.sources if train is not None else []:
            problem = self._fit(source, train)
            if problem is not None:
                return problem
        return None

    def _fit(self, source: Any, train: Any) -> str | None:
        # A hub base's objective is read by the worker: `label` data may be for a classifier.
        choices = [train.needed_columns]
        if train.objective is None and train.format != "chat":
            choices.append(("input", "label"))
        found = [self._problem(source, columns) for columns in choices]
        return found[0] if all(problem is not None for problem in found) else None

    def eval_problem(self, spec: JobSpec) -> tuple[str, str] | None:
        """(key, why) for an evaluation set (`train.eval_dataset`, `eval.datasets.NAME`) that cannot serve."""
        train = spec.train
        if train is None:
            return None
        sets = {"train.eval_dataset": train.eval_source} if train.eval_dataset is not None else {}
        for name, item in (spec.eval.datasets.items() if spec.eval is not None else ()):
            sets[f"eval.datasets.{name}"] = as_source(item, train.columns, train.split)
        for key, source in sets.items():
            problem = self._fit(source, train)
            if problem is not None:
                return key, problem
        return None


def check_priority(value: Any) -> bool:
    """Whether `value` is a valid priority (an int from MIN_PRIORITY to MAX_PRIORITY, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_PRIORITY <= value <= MAX_PRIORITY


def _header(data: Mapping[str, Any], source: Path | None, problems: Problems) -> tuple[str, str | None, Mapping]:
    """The batch's name, base_model and defaults; their problems go to `problems`."""
    where = "batch file"
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.add(where, f"key `{key}`: unknown top-level key{_suggest(key, TOP_LEVEL_KEYS)}")

    name = data.get("batch")
    if name is None:
        name = source.stem if source is not None else "batch"
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_BATCH_NAME:
        problems.add(where, f"key `batch`: must be a non-empty name of at most {MAX_BATCH_NAME} characters")
        name = "batch"

    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        problems.add(where, "key `base_model`: must be a string (hub id, directory or random:<preset>)")
        base_model = None

    priority = data.get("priority")
    if priority is not None and not check_priority(priority):
        problems.add(where, f"key `priority`: must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} "
                     f"(higher runs first), not {priority!r}")

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        problems.add(where, "key `defaults`: must be a mapping of job keys (lora, layer, train, ...)")
        defaults = {}
    for key, why in (("task", "every job names its own task"), ("name", "names are unique: give each job its own"),
                     ("matrix", "put `matrix` at the top level of the batch file (it applies to every job)"),
                     ("sample", "put `sample` at the top level of the batch file (it applies to every job)")):
        if key in defaults:
            problems.add(where, f"key `defaults.{key}`: {why}; remove it from defaults")
    return name, base_model, defaults


def _entries(data: Mapping[str, Any], raw_jobs: list[Any], problems: Problems) -> tuple[list[_Entry], bool]:
    """The job entries with their sweeps, and whether every `matrix` and `sample` was well formed."""
    well_formed = True
    try:
        batch_matrix = Matrix.parse(data.get("matrix"))
        batch_matrix.check_exclude()
    except SweepError as error:
        problems.add("batch file", str(error))
        batch_matrix, well_formed = Matrix(), False
    try:
        batch_sample = Sample.parse(data.get("sample"))
    except SweepError as error:
        problems.add("batch file", str(error))
        batch_sample, well_formed = Sample(), False

    try:  # what every entry without a matrix or sample of its own expands to
        shared = Sweep.merged(batch_matrix, Matrix(), batch_sample, Sample())
    except SweepError as error:
        shared, failure = Sweep(), error
    else:
        failure = None
    entries = []
    for index, raw in enumerate(raw_jobs):
        if not isinstance(raw, Mapping):
            entries.append(_Entry(index, raw))
            continue
        entry = _Entry(index, {key: value for key, value in raw.items() if key not in ("matrix", "sample")})
        sweep = shared
        if raw.get("matrix") is not None or raw.get("sample") is not None:
            try:
                sweep = Sweep.merged(batch_matrix, Matrix.parse(raw.get("matrix")),
                                     batch_sample, Sample.parse(raw.get("sample")))
            except SweepError as error:
                problems.add(entry.label(), str(error))
                well_formed, sweep = False, Sweep()
        elif failure is not None:
            # The batch-level sweep is wrong for every such job: one line, for the batch file.
            problems.add("batch file", str(failure), "batch-sweep", once=True)
            well_formed = False
        entries.append(dataclasses.replace(entry, sweep=sweep))
    return entries, well_formed


def _check_size(entries: list[_Entry], problems: Problems) -> None:
    """Raise SpecError, before anything is expanded, when the batch would make more than MAX_JOBS jobs."""
    sizes = [entry.sweep.size() for entry in entries]
    total = sum(sizes)
    if total <= MAX_JOBS:
        return
    biggest = max(range(len(entries)), key=sizes.__getitem__)
    at_most = " up to" if any(entry.sweep.matrix.exclude for entry in entries) else ""
    problems.add("batch file", f"the batch would expand to{at_most} {total:,} jobs, more than the limit of "
                 f"{MAX_JOBS:,} ({entries[biggest].label()} alone makes {sizes[biggest]:,}); shrink its "
                 "matrix or sample, or split the batch into several files")
    problems.raise_if_any()


def _job_spec(job: dict[str, Any], label: str, group: int, datasets: _Datasets, models: ModelConfigs,
              problems: Problems) -> JobSpec | None:
    """The validated spec of one expanded job, or None after recording its problems."""
    datasets.resolve(job)
    try:
        spec = JobSpec.model_validate(job)
    except ValidationError as error:
        for line in describe_validation_error(error):
            problems.add(label, line, group)
        return None
    problem = datasets.problem(spec)
    if problem is not None:
        problems.add(label, f"key `train.dataset`: {problem}", group)
        return None
    problem = format_problem(spec)
    if problem is not None:
        problems.add(label, f"key `train.format`: {problem}", group)
        return None
    found = datasets.eval_problem(spec)
    if found is not None:
        problems.add(label, f"key `{found[0]}`: {found[1]}", group)
        return None
    return spec if _fits_base_model(spec, label, group, models, problems) else None


def _fits_base_model(spec: JobSpec, label: str, group: int, models: ModelConfigs, problems: Problems) -> bool:
    """Whether the job suits its base model's config (when it can be read here); records each problem."""
    base, problem = models.find(spec.base_model)
    if problem is not None:
        problems.add(label, f"key `base_model`: {problem}", group)
        return False
    found = job_problems(spec, base) if base is not None else []
    for key, message in found:
        problems.add(label, f"key `{key}`: {message}", group)
    return not found


def _typed(params: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """`params` with a number written as a string taken as the number the spec holds: YAML reads
    `1e-3` (no dot) as a string, and a result column of learning rates must compare as numbers."""
    if not any(isinstance(value, str) for value in params.values()):
        return params
    dumped = spec.to_json()
    typed = dict(params)
    for key, value in params.items():
        held: Any = dumped
        for segment in spec_paths()[key].segments:
            held = held.get(segment) if isinstance(held, Mapping) else None
        if isinstance(value, str) and isinstance(held, int | float) and not isinstance(held, bool):
            typed[key] = held
    return typed


def _names(entries: list[_Entry], positions: list[range], problems: Problems) -> dict[str, list[int]]:
    """Job name -> the positions of the jobs that carry it (all the jobs a named entry makes)."""
    names: dict[str, list[int]] = {}
    for entry, where in zip(entries, positions, strict=True):
        name = entry.raw.get("name") if isinstance(entry.raw, Mapping) else None
        if not isinstance(name, str) or not where:
            continue
        if name in names:
            first = names[name][0]
            problems.add(_job_label(where[0], entry.raw), f"key `name`: `{name}` is already the name of job "
                         f"{first}; names are unique in a batch file (a matrix's jobs share theirs)")
            continue
        names[name] = list(where)
    return names


def parse_batch(data: Any, source: Path | None = None) -> Batch:
    """Validate a loaded batch document and expand its sweeps; raises SpecError with every problem found.

    A malformed `matrix` or `sample`, or a batch that would expand beyond MAX_JOBS jobs, is reported
    before any job is expanded (the positions that name later jobs depend on it).
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"batch file: the top level must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    problems = Problems()
    name, base_model, defaults = _header(data, source, problems)
    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        problems.add("batch file", "key `jobs`: must be a non-empty list of jobs (each with at least `task`)")
        raw_jobs = []
    entries, well_formed = _entries(data, raw_jobs, problems)
    if not well_formed:
        problems.raise_if_any()
    _check_size(entries, problems)

    datasets = _Datasets(source.parent if source is not None else Path.cwd())
    models = ModelConfigs()
    specs: list[JobSpec] = []
    params: list[dict[str, Any]] = []
    nodes: list[Node] = []
    positions: list[range] = []
    for entry in entries:
        start = len(nodes)
        if not isinstance(entry.raw, Mapping):
            label = _job_label(start, entry.raw)
            problems.add(label, "must be a mapping such as {task: reverse, extension: lora}")
            nodes.append(Node(label, entry.index, None))
            positions.append(range(start, start + 1))
            continue
        merged = deep_merge(defaults, entry.raw)
        if base_model is not None:
            merged.setdefault("base_model", base_model)
        combinations = entry.sweep.combinations()
        if not combinations:
            problems.add(entry.label(), "key `matrix.exclude`: excludes every combination; this entry makes no job")
        for values in combinations:
            label = _job_label(len(nodes), entry.raw, values)
            job = apply(merged, values) if values else merged
            spec = _job_spec(job, label, entry.index, datasets, models, problems)
            nodes.append(Node(label, entry.index, spec, entry.written_from(values)))
            if spec is not None:
                specs.append(spec)
                params.append(_typed(values, spec))
        positions.append(range(start, len(nodes)))

    needs = resolve_needs(nodes, _names(entries, positions, problems), problems)
    problems.raise_if_any()
    priority = data.get("priority")
    return Batch(name=name, source=source, base_model=base_model, jobs=specs, params=params, needs=needs,
                 priority=priority if check_priority(priority) else None)


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
