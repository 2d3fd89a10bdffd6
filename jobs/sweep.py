"""Sweeps: the `matrix` and `sample` keys of a batch file, and the combinations they make.

    sweep = Sweep.merged(batch_matrix, job_matrix, batch_sample, job_sample)
    sweep.size()            # how many jobs, at most, before anything is expanded
    sweep.combinations()    # one {dotted key: value} per job, in a fixed order

Keys are dotted spec paths (`lora.r`, `train.learning_rate`, `task`, `layer.from`), checked
against the spec models so a typo is refused with a suggestion rather than ignored.
`include` / `exclude` follow GitHub Actions' matrix rules. `sample` draws from
`random.Random(seed)`, so the same seed always gives the same trials. A job's own `matrix`
multiplies the batch-level one, and for a key in both the job's list wins; a job's own
`sample` is merged over the batch-level one the same way.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import BaseModel

from jobs.spec import JobSpec

#: A batch that would expand beyond this many jobs is refused before it is expanded.
MAX_JOBS = 100_000
#: Job keys a matrix or a sample cannot vary: they say how jobs relate, not how one is built.
UNSWEEPABLE = ("name", "needs", "matrix", "sample")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


class SweepError(ValueError):
    """A `matrix` or `sample` is malformed: `key` (`matrix.lora.r`) and what is wrong with it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"key `{key}`: {message}")
        self.key, self.message = key, message

    def within(self, where: str) -> SweepError:
        """The same error, its key prefixed with the mapping it was found in (`matrix`)."""
        return SweepError(f"{where}.{self.key}" if self.key else where, self.message)


@dataclass(frozen=True)
class SpecPath:
    """A dotted path into a job spec, spelled as the batch file spells it (`layer.from`)."""

    key: str
    segments: tuple[str, ...]
    #: a whole section (`lora`): a mapping given for it is merged into the job's, not put in its place
    section: bool


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [arg for arg in get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]


@functools.cache
def spec_paths() -> dict[str, SpecPath]:
    """Every dotted path a matrix or sample may set, by each accepted spelling (`from` and `from_`)."""
    paths: dict[str, SpecPath] = {}

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, info in model.model_fields.items():
            if not prefix and name in UNSWEEPABLE:
                continue
            spelled = info.alias or name
            segments = (*prefix, spelled)
            nested = _models_in(info.annotation)
            path = SpecPath(".".join(segments), segments, section=bool(nested))
            paths[path.key] = path
            if spelled != name:
                paths[".".join((*prefix, name))] = path
            for sub in nested:
                walk(sub, segments)

    walk(JobSpec, ())
    return paths


def spec_path(key: Any) -> SpecPath:
    """The SpecPath `key` names; raises SweepError naming the key, with a did-you-mean."""
    if not isinstance(key, str):
        raise SweepError(repr(key), "keys are dotted spec paths such as `lora.r` or `train.learning_rate`")
    if key in UNSWEEPABLE:
        raise SweepError(key, f"`{key}` cannot vary in a matrix or sample; "
                         "give it on the job itself")
    paths = spec_paths()
    if key in paths:
        return paths[key]
    canonical = sorted({path.key for path in paths.values()})
    close = difflib.get_close_matches(key, canonical, n=1)
    hint = f"did you mean `{close[0]}`?" if close else "use a job key (`task`, `extension`, ...) or " \
        "`<section>.<key>` (`lora.r`, `train.learning_rate`, ...)"
    raise SweepError(key, f"not a job spec key; {hint}")


def _value_key(value: Any) -> str:
    """A hashable stand-in for a matrix value (lists and mappings are values too)."""
    return json.dumps(value, sort_keys=True)


def _check_value(key: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise SweepError(key, f"value {value!r} is not a string, number, boolean, list or mapping "
                         "(quote it)") from None


def _parse_entries(where: str, entries: Any) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and e for e in entries):
        raise SweepError(where, "must be a list of mappings of dotted keys to values, "
                         "e.g. [{lora.r: 8, lora.alpha: 32}]")
    parsed = []
    try:
        for entry in entries:
            combination: dict[str, Any] = {}
            for key, value in entry.items():
                path = spec_path(key)
                _check_value(path.key, value)
                combination[path.key] = value
            parsed.append(combination)
    except SweepError as error:
        raise error.within(where) from None
    return parsed


@dataclass(frozen=True)
class Matrix:
    """A parsed `matrix`: axes (dotted key -> values, in written order), include and exclude entries."""

    axes: dict[str, list[Any]] = field(default_factory=dict)
    include: list[dict[str, Any]] = field(default_factory=list)
    exclude: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: Any, where: str = "matrix") -> Matrix:
        """Parse a `matrix` mapping; raises SweepError naming the key (`matrix.lora.r`)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise SweepError(where, "must be a mapping of dotted keys to lists, "
                             "e.g. {lora.r: [4, 8], train.seed: [0, 1]}")
        axes: dict[str, list[Any]] = {}
        include: list[dict[str, Any]] = []
        exclude: list[dict[str, Any]] = []
        try:
            for key, values in raw.items():
                if key == "include":
                    include = _parse_entries("include", values)
                    continue
                if key == "exclude":
                    exclude = _parse_entries("exclude", values)
                    continue
                path = spec_path(key)
                axes[path.key] = _parse_axis(path.key, values)
        except SweepError as error:
            raise error.within(where) from None
        return cls(axes, include, exclude)

    def check_exclude(self, where: str = "matrix") -> None:
        """Raise SweepError for an exclude key that is not an axis (it would exclude nothing)."""
        for entry in self.exclude:
            for key in entry:
                if key not in self.axes:
                    axes = ", ".join(f"`{axis}`" for axis in self.axes) or "none"
                    raise SweepError(f"{where}.exclude", f"`{key}` is not a key of the matrix (its keys: "
                                     f"{axes}); an exclude entry names matrix keys only")

    def merged(self, job: Matrix) -> Matrix:
        """This batch-level matrix with a job's over it: the job's new keys add axes (after the batch's,
        so they vary faster), a key in both takes the job's list, and the include/exclude entries of
        both apply."""
        return Matrix({**self.axes, **job.axes}, [*self.include, *job.include], [*self.exclude, *job.exclude])

    @property
    def keys(self) -> set[str]:
        return {*self.axes, *(key for entry in self.include for key in entry)}

    def size(self) -> int:
        """How many combinations, at most (exclude only removes): computed without expanding."""
        if not self.axes:
            return len(self.include) or 1
        return math.prod(len(values) for values in self.axes.values()) + len(self.include)

    def combinations(self) -> list[dict[str, Any]]:
        """The combinations, GitHub Actions style: the product of the axes (last key fastest) minus
        exclude matches, then each include entry merged into every combination it matches on the
        axes it names (never overwriting an axis value) or, matching none, added on its own."""
        if not self.axes:
            return [dict(entry) for entry in self.include] or [{}]
        keys = list(self.axes)
        originals = [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.axes.values())]
        originals = [c for c in originals if not any(_matches(c, entry) for entry in self.exclude)]
        extra: list[dict[str, Any]] = []
        for entry in self.include:
            own = {key: value for key, value in entry.items() if key in self.axes}
            targets = [c for c in originals if _matches(c, own)]
            for combination in targets:
                combination.update(entry)
            if not targets:
                extra.append(dict(entry))
        return originals + extra


def _matches(combination: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    return all(key in combination and combination[key] == value for key, value in entry.items())


def _parse_axis(key: str, values: Any) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise SweepError(key, f"must be a non-empty list of values, e.g. `{key}: [a, b]` "
                         f"(got {values!r})")
    seen: set[str] = set()
    for value in values:
        _check_value(key, value)
        marker = _value_key(value)
        if marker in seen:
            raise SweepError(key, f"value {value!r} is listed twice")
        seen.add(marker)
    return list(values)


# --- sample ---------------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _float(value: Any) -> Any:
    """`value`, or the float a string spells: YAML reads `1e-4` (no dot) as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass(frozen=True)
class Distribution:
    """One sampled key: `choice` from a list, `uniform`/`loguniform` floats or `int` in [lo, hi]."""

    kind: str
    args: tuple[Any, ...]

    @classmethod
    def parse(cls, key: str, raw: Any) -> Distribution:
        """Parse `{choice: [...]}`, `{uniform: [lo, hi]}`, ...; raises SweepError naming `key`."""
        example = f"`{key}: {{loguniform: [1.0e-4, 1.0e-2]}}` or `{key}: {{choice: [4, 8]}}`"
        if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
            raise SweepError(key, f"must be one distribution, {', '.join(DISTRIBUTIONS)}: e.g. {example}")
        kind, args = next(iter(raw.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise SweepError(f"{key}.choice", "must be a non-empty list of values")
            for value in args:
                _check_value(key, value)
            return cls(kind, tuple(args))
        if isinstance(args, list) and kind != "int":
            args = [_float(a) for a in args]
        if not isinstance(args, list) or len(args) != 2 or not all(_number(a) for a in args):
            raise SweepError(f"{key}.{kind}", f"must be [lo, hi], two numbers (got {args!r})")
        lo, hi = args
        if kind == "int" and not all(isinstance(a, int) for a in args):
            raise SweepError(f"{key}.int", f"bounds must be integers (got {args!r})")
        if lo >= hi:
            raise SweepError(f"{key}.{kind}", f"lo must be less than hi (got {args!r})")
        if kind == "loguniform" and lo <= 0:
            raise SweepError(f"{key}.loguniform", f"bounds must be > 0 (got {args!r})")
        return cls(kind, (lo, hi))

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.args)
        lo, hi = self.args
        if self.kind == "int":
            return rng.randint(lo, hi)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return rng.uniform(lo, hi)


@dataclass(frozen=True)
class Sample:
    """A parsed `sample`: `trials` draws of every distribution from `random.Random(seed)`."""

    trials: int | None = None
    seed: int | None = None
    distributions: dict[str, Distribution] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any, where: str = "sample") -> Sample:
        """Parse a `sample` mapping; raises SweepError naming the key (`sample.trials`)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise SweepError(where, "must be a mapping: {trials: N, seed: S, <dotted key>: "
                             "{choice: [..]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {int: [lo, hi]}}")
        trials, seed = raw.get("trials"), raw.get("seed")
        if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
            raise SweepError(f"{where}.trials", f"must be a whole number >= 1 (got {trials!r})")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise SweepError(f"{where}.seed", f"must be a whole number (got {seed!r})")
        distributions: dict[str, Distribution] = {}
        try:
            for key, value in raw.items():
                if key not in ("trials", "seed"):
                    path = spec_path(key)
                    distributions[path.key] = Distribution.parse(path.key, value)
        except SweepError as error:
            raise error.within(where) from None
        return cls(trials, seed, distributions)

    def merged(self, job: Sample) -> Sample:
        """This batch-level sample with a job's over it (its trials, seed and keys win)."""
        return Sample(job.trials if job.trials is not None else self.trials,
                      job.seed if job.seed is not None else self.seed,
                      {**self.distributions, **job.distributions})

    @property
    def active(self) -> bool:
        return bool(self.distributions) or self.trials is not None

    def check(self, where: str = "sample") -> None:
        """Raise SweepError when an active sample lacks `trials` or keys to draw."""
        if not self.active:
            return
        if self.trials is None:
            raise SweepError(f"{where}.trials", "required: how many random combinations to draw")
        if not self.distributions:
            raise SweepError(where, "give at least one key to draw, e.g. "
                             "`train.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}`")

    def draws(self) -> list[dict[str, Any]]:
        """`trials` combinations, the same for the same seed (default 0), keys in written order."""
        if not self.active:
            return [{}]
        rng = random.Random(self.seed or 0)
        return [{key: dist.draw(rng) for key, dist in self.distributions.items()} for _ in range(self.trials or 0)]


@dataclass(frozen=True)
class Sweep:
    """What one job entry of a batch file expands to: its matrix (batch-level merged with its own)
    times its sample (the same: batch-level merged with its own)."""

    matrix: Matrix = field(default_factory=Matrix)
    sample: Sample = field(default_factory=Sample)

    @classmethod
    def merged(cls, batch_matrix: Matrix, job_matrix: Matrix, batch_sample: Sample, job_sample: Sample) -> Sweep:
        """The sweep of one job entry; raises SweepError for a key in both its matrix and its sample,
        a job-level exclude naming no axis, or a sample without trials."""
        matrix, sample = batch_matrix.merged(job_matrix), batch_sample.merged(job_sample)
        matrix.check_exclude()
        sample.check()
        both = [key for key in sample.distributions if key in matrix.keys]
        if both:
            raise SweepError(f"sample.{both[0]}", f"`{both[0]}` is also a matrix key; vary it in one of them")
        return cls(matrix, sample)

    def size(self) -> int:
        """How many jobs, at most, without expanding."""
        return self.matrix.size() * (self.sample.trials if self.sample.active else 1)

    def combinations(self) -> list[dict[str, Any]]:
        """One {dotted key: value} per job: matrix combinations outermost, each with every sample draw
        (so each matrix cell gets the same trials). `[{}]` when there is nothing to sweep."""
        draws = self.sample.draws()
        return [{**combination, **draw} for combination in self.matrix.combinations() for draw in draws]


def apply(job: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the (merged) job mapping with each dotted key set to its value; a mapping given for a
    whole section is merged into the job's section."""
    from jobs.batch import deep_merge  # batch imports this module

    result = deep_merge(job, {})
    paths = spec_paths()
    for key, value in values.items():
        path = paths[key]
        target = result
        for segment in path.segments[:-1]:
            if not isinstance(target.get(segment), Mapping):
                target[segment] = {}
            target = target[segment]
        last = path.segments[-1]
        if path.section and isinstance(value, Mapping) and isinstance(target.get(last), Mapping):
            target[last] = deep_merge(target[last], value)
        else:
            target[last] = copy.deepcopy(value)
    return result


def describe(params: Mapping[str, Any], limit: int = 120) -> str:
    """`lora.r=16, train.learning_rate=0.003`: a job's params as its error messages show them."""
    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, str):
            return value
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else json.dumps(value)

    text = ", ".join(f"{key}={shown(value)}" for key, value in params.items())
    return text if len(text) <= limit else text[:limit - 3] + "..."
