"""The `graftq` command line (click).

The root group owns the connection options and puts a `State` with lazily built
settings, database and Celery app on `ctx.obj`; commands are thin. Heavy modules are
imported inside the commands that need them: `--help`, `submit --dry-run`, `results` and
`status` never import torch/transformers/peft, and only commands that talk to the broker
import Celery.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from jobs.display import console, duration, job_eta
from jobs.extensions import EXTENSION_KINDS

if TYPE_CHECKING:
    from celery import Celery

    from db.session import Database
    from jobs.batch import Batch
    from jobs.settings import Settings
    from jobs.spec import JobSpec

F = TypeVar("F", bound=Callable[..., Any])

STATUSES = ("waiting", "queued", "running", "succeeded", "failed", "cancelled", "skipped")
TABLE_COLUMNS = (
    "id", "batch", "task", "kind", "extension", "status", "attempts", "device", "trainable_params",
    "trainable_pct", "train_loss", "eval_loss", "steps", "train_seconds",
)
#: Rows the `results` table shows when no --limit is given.
TABLE_DEFAULT_LIMIT = 50


class State:
    """What the commands share: settings, the database and the Celery app, built on first use."""

    def __init__(self, database_url: str | None, broker_url: str | None, artifacts_dir: str | None):
        self._overrides = {"database_url": database_url, "broker_url": broker_url, "artifacts_dir": artifacts_dir}

    @functools.cached_property
    def settings(self) -> Settings:
        from jobs.settings import Settings, SettingsError

        try:
            return Settings.from_env(**self._overrides)
        except SettingsError as error:
            raise click.UsageError(str(error)) from None

    @functools.cached_property
    def database(self) -> Database:
        from sqlalchemy.exc import SQLAlchemyError

        from db.errors import DatabaseError
        from db.session import get_database

        try:
            return get_database(self.settings.database_url)
        except DatabaseError as error:
            raise click.ClickException(str(error)) from None
        except (SQLAlchemyError, OSError) as error:
            raise click.ClickException(
                f"cannot open the database {self.settings.database_url!r}: {error}; "
                "check --database-url / GRAFTQ_DATABASE_URL"
            ) from None

    @functools.cached_property
    def celery(self) -> Celery:
        settings = self.settings  # a bad GRAFTQ_* value is a usage error before Celery is loaded
        from jobs.celery_app import configure

        return configure(settings)


def _state(ctx: click.Context) -> State:
    return ctx.ensure_object(State) if ctx.obj is None else ctx.obj


def _load(path: Path) -> Batch:
    from jobs.batch import load_batch
    from jobs.errors import SpecError

    try:
        return load_batch(path)
    except SpecError as error:
        raise click.ClickException(str(error)) from None


def _require_worker_extra(command: str) -> None:
    """Refuse early, with the fix, when the ML packages the jobs need are not installed."""
    import importlib.util

    missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        raise click.ClickException(
            f"`graftq {command}` runs jobs and needs {', '.join(missing)}: install the worker extra "
            "(pip install 'graftq[worker]'); `graftq submit` sends jobs to workers without them"
        )


def _handle_db_errors(func: F) -> F:
    """Turn a database failure inside a command into a one-line error, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as error:
            # Look the class up only if SQLAlchemy is loaded: `submit --dry-run` never loads it.
            exc_module = sys.modules.get("sqlalchemy.exc")
            if exc_module is not None and isinstance(error, exc_module.OperationalError):
                raise click.ClickException(f"database error: {error.orig}") from None
            raise

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--database-url", envvar="GRAFTQ_DATABASE_URL", metavar="URL",
              help="Results database (SQLAlchemy URL). [env: GRAFTQ_DATABASE_URL; default: "
                   "sqlite:///graftq-data/graftq.db]")
@click.option("--broker-url", envvar="GRAFTQ_BROKER_URL", metavar="URL",
              help="Celery broker. [env: GRAFTQ_BROKER_URL; default: redis://127.0.0.1:6379/0]")
@click.option("--artifacts-dir", envvar="GRAFTQ_ARTIFACTS_DIR", metavar="DIR",
              help="Where job artifacts are written: a directory, or s3://BUCKET/PREFIX (S3-compatible storage). "
                   "[env: GRAFTQ_ARTIFACTS_DIR; default: ./graftq-data/artifacts]")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, broker_url: str | None, artifacts_dir: str | None) -> None:
    """graftq: run batches of LoRA / added-layer / hybrid model-extension experiments.

    Write a batch file, then `graftq run BATCH` on this machine, or `graftq submit BATCH`
    to a pool of `graftq worker`s; `graftq results` queries what they recorded.
    """
    ctx.obj = State(database_url, broker_url, artifacts_dir)


# --- submit / run ------------------------------------------------------------------------------


def _print_key_reference(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from jobs.spec import SECTION_SPECS, JobSpec

    lines = ["Batch file keys (per job; `defaults` takes the same keys except task):", ""]
    for name, field in JobSpec.model_fields.items():
        lines.append(f"  {name:<16} {field.description or ''}")
    for section, model in SECTION_SPECS.items():
        lines += ["", f"  {section}:"]
        for name, field in model.model_fields.items():
            default = "" if field.is_required() else f" [default: {field.default}]"
            lines.append(f"    {field.alias or name:<16} {field.description or ''}{default}")
    click.echo("\n".join(lines))
    ctx.exit(0)


@cli.command()
@click.argument("batch_file", metavar="BATCH", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and print the expanded jobs; write nothing.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train each train job for at most N steps (N wins over `epochs`): a quick smoke test of "
                   "a batch on the pool. The recorded specs say N.")
@click.option("--priority", type=click.IntRange(min=0, max=9), default=None, metavar="0-9",
              help="The batch's priority (higher first: a free worker takes the queued job of highest priority); "
                   "replaces the file's top-level `priority`. Jobs that set their own `priority` keep it.")
@click.option("--help-keys", is_flag=True, expose_value=False, is_eager=True, callback=_print_key_reference,
              help="Describe every batch-file key and exit.")
@click.pass_context
@_handle_db_errors
def submit(ctx: click.Context, batch_file: Path, dry_run: bool, max_steps: int | None, priority: int | None) -> None:
    """Validate BATCH, record its jobs as queued and enqueue them on the broker.

    Prints the batch id. Nothing is recorded or enqueued when the batch file has an
    error or the broker cannot be reached.
    """
    from jobs.errors import BrokerUnavailable, SpecError
    from jobs.submit import check_broker, check_pool_devices, submit_batch

    state = _state(ctx)
    batch = _load(batch_file)
    if max_steps is not None:
        batch = _with_max_steps(batch, max_steps)
    if priority is not None:
        batch = dataclasses.replace(batch, priority=priority)
    try:
        check_pool_devices(batch)
    except SpecError as error:
        raise click.ClickException(str(error)) from None
    if dry_run:
        _print_dry_run(batch, state.settings)
        return

    try:
        check_broker(state.celery)
        submitted = submit_batch(batch, state.settings, state.database, state.celery, broker_checked=True)
    except (BrokerUnavailable, SpecError) as error:
        raise click.ClickException(str(error)) from None
    queued = len(submitted.job_ids) - len(submitted.waiting)
    waiting = f", {len(submitted.waiting)} waiting for the jobs they need" if submitted.waiting else ""
    click.echo(f"submitted batch {submitted.batch_id} ({batch.name}): {queued} jobs queued{waiting}; "
               f"follow it with `graftq status {submitted.batch_id}`", err=True)
    click.echo(submitted.batch_id)


def _print_dry_run(batch: Batch, settings: Settings) -> None:
    """The expanded jobs as a table (one column per matrix/sample key), then the dataset files they read."""
    from collections import Counter

    def shown(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return value if isinstance(value, str) else json.dumps(value)

    def waits_for(needs: list[int | str]) -> str:
        # Positions grouped by the name they answer to, runs of positions as `a-b`.
        groups: dict[str, list[int]] = {}
        for position in (p for p in needs if isinstance(p, int)):
            groups.setdefault(batch.jobs[position].name or "", []).append(position)
        parts = []
        for name, positions in groups.items():
            runs = [[positions[0], positions[0]]]
            for position in positions[1:]:
                if position == runs[-1][1] + 1:
                    runs[-1][1] = position
                else:
                    runs.append([position, position])
            where = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
            parts.append(f"{name} ({where})" if name else f"#{where}")
        return ", ".join([*parts, *(f"job:{p}" for p in needs if isinstance(p, str))]) or "-"

    keys = list(dict.fromkeys(key for params in batch.params for key in params))
    many_bases = len({spec.base_model for spec in batch.jobs}) > 1 and "base_model" not in keys
    columns = ["#", "name", "task", "extension", "kind", *(["base_model"] if many_bases else []), *keys,
               "needs", "queue"]
    rows = []
    for position, (spec, params, needs) in enumerate(zip(batch.jobs, batch.params, batch.needs, strict=True)):
        rows.append([str(position), spec.name or "-", spec.task, spec.extension, spec.kind.value,
                     *([spec.base_model] if many_bases else []), *(shown(params.get(key)) for key in keys),
                     waits_for(needs), settings.queue_for(spec.queue_kind)])
    numeric = {"#", *(key for key in keys if all(isinstance(p.get(key), int | float) for p in batch.params))}
    click.echo(f"batch {batch.name!r}: {len(batch.jobs)} jobs (dry run: nothing recorded or enqueued)")
    _print(_table(columns, rows, right=numeric))
    datasets = Counter(path for spec in batch.jobs if spec.train is not None for path in spec.train.datasets)
    if datasets:
        click.echo("datasets:\n" + "\n".join(f"  {path} ({count} job{'s' if count > 1 else ''})"
                                              for path, count in datasets.items()))


@cli.command()
@click.argument("batch_file", metavar="BATCH", type=click.Path(path_type=Path))
@click.option("--max-steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train each train job for at most N steps (N wins over `epochs`): a quick smoke test of "
                   "a batch. The recorded specs say N.")
@click.option("--pack", type=click.IntRange(min=1, max=64), default=1, show_default=True, metavar="K",
              help="Train up to K compatible LoRA jobs together on one base model (README: Packed training).")
@click.pass_context
@_handle_db_errors
def run(ctx: click.Context, batch_file: Path, max_steps: int | None, pack: int) -> None:
    """Run every job of BATCH on this machine (no broker needed), with live progress.

    The jobs are recorded in the results database and executed one after another
    through the same task code as on a worker pool, each after the jobs it needs (a job whose
    need failed is skipped). Exits 0 only if every job succeeded.
    """
    from jobs.errors import SpecError
    from worker.runner import run_batch

    state = _state(ctx)
    batch = _load(batch_file)
    if max_steps is not None:
        batch = _with_max_steps(batch, max_steps)
    _require_worker_extra("run")
    _set_pack(pack)
    try:
        ok = run_batch(batch, state.settings, state.database)
    except SpecError as error:
        raise click.ClickException(str(error)) from None
    ctx.exit(0 if ok else 1)


def _set_pack(pack: int) -> None:
    """`--pack`: read by the task (worker.packing.pack_size) in this process and the workers it starts."""
    import os

    os.environ["GRAFTQ_PACK"] = str(pack)


def _with_max_steps(batch: Batch, max_steps: int) -> Batch:
    """`batch` with every train job's `train.max_steps` capped at `max_steps`."""
    import dataclasses

    def capped(spec: JobSpec) -> JobSpec:
        if spec.train is None or (spec.train.max_steps is not None and spec.train.max_steps <= max_steps):
            return spec
        update: dict = {"train": spec.train.model_copy(update={"max_steps": max_steps})}
        if spec.adalora is not None and spec.adalora.total_step and spec.adalora.total_step > max_steps:
            update["adalora"] = _compressed_adalora_schedule(spec.adalora, max_steps)
        return spec.model_copy(update=update)

    return dataclasses.replace(batch, jobs=[capped(spec) for spec in batch.jobs])


def _compressed_adalora_schedule(adalora, steps: int):
    """AdaLoRA's rank-budget schedule squeezed into `steps`: a smoke run still prunes ranks the way
    the full run would, instead of stopping inside the warm-up of a schedule laid out for more steps."""
    ratio = steps / adalora.total_step
    tinit, tfinal = int(adalora.tinit * ratio), int(adalora.tfinal * ratio)
    while tinit + tfinal >= steps and (tinit or tfinal):  # leave at least one step for reallocating
        if tfinal:
            tfinal -= 1
        else:
            tinit -= 1
    return adalora.model_copy(update={"total_step": steps, "tinit": tinit, "tfinal": tfinal})


# --- worker ------------------------------------------------------------------------------------


@cli.command()
@click.option("--gpus", default="all", show_default=True, metavar="all|none|0,1",
              help="`all`: one worker process per visible GPU; `none`: one CPU worker; or GPU indices.")
@click.option("--queues", default=None, metavar="Q1,Q2",
              help="Queues to consume (default: graftq.gpu,graftq for GPU workers, graftq.cpu,graftq for a CPU worker).")
@click.option("--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--reap-interval", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between looks for jobs whose worker died (re-queued or failed); 0 disables.")
@click.option("--max-restarts", default=5, show_default=True, type=click.IntRange(min=0),
              help="Restarts of a worker process that keeps exiting within a minute before giving up.")
@click.option("--jobs-per-gpu", default=1, show_default=True, type=click.IntRange(min=1, max=64), metavar="K",
              help="Worker processes per GPU (per CPU worker without one): up to K jobs at once on one device, "
                   "each in its own process. Fills a big GPU with small jobs.")
@click.option("--cpu-slots", default=1, show_default=True, type=click.IntRange(min=1, max=64),
              help="With --gpus none: CPU worker processes, each a device for `resources.gpus` jobs (a job "
                   "asking for 2 runs as 2 gloo ranks).")
@click.option("--pack", type=click.IntRange(min=1, max=64), default=1, show_default=True, metavar="K",
              help="Train up to K compatible LoRA jobs together on one base model (README: Packed training).")
@click.pass_context
def worker(ctx: click.Context, gpus: str, queues: str | None, loglevel: str, reap_interval: float,
           max_restarts: int, jobs_per_gpu: int, cpu_slots: int, pack: int) -> None:
    """Serve the broker: one Celery worker process per GPU (one job at a time each), or a CPU worker.

    On SIGTERM/SIGINT a training job saves a checkpoint at its next step and goes back to the
    queue (another worker resumes it), then every process exits; a second signal stops them at
    once (their jobs are re-queued later by a reaper, like a dead worker's).
    A process that exits unexpectedly is restarted. With several GPUs, one more process per job
    size N (2 up to the GPU count) takes `resources.gpus: N` jobs once N GPUs are free, and runs
    them data-parallel.
    """
    from worker.launcher import LauncherError, parse_gpus, serve

    state = _state(ctx)
    try:
        selection = parse_gpus(gpus)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--gpus") from None
    _require_worker_extra("worker")
    _set_pack(pack)
    try:
        code = serve(state.settings, selection, queues=queues, loglevel=loglevel.upper(),
                     reap_interval=reap_interval, max_restarts=max_restarts, jobs_per_gpu=jobs_per_gpu,
                     cpu_slots=cpu_slots)
    except LauncherError as error:
        raise click.ClickException(str(error)) from None
    ctx.exit(code)


# --- status / results / show / cancel ------------------------------------------------------------


def _fmt(value: Any) -> str:
    import datetime as dt

    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def _iso(value: Any) -> Any:
    import datetime as dt

    return value.isoformat() if isinstance(value, dt.datetime) else value


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[str] = (),
           title: str | None = None) -> Any:
    """Rows as a table: rich's on a terminal, plain aligned text otherwise (a string).

    Piped or redirected output stays one line per row, easy to grep and diff, and skips rich,
    whose import and layout cost more than the query.
    """
    if _is_terminal():
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, justify="right" if column in right else "left")
        for row in rows:
            table.add_row(*row)
        return table
    widths = [max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(width) if column in right else cell.ljust(width)
                         for column, cell, width in zip(columns, cells, widths, strict=True)).rstrip()

    return "\n".join([*([title] if title else []), line(columns), *(line(row) for row in rows)])


def _print(renderable: Any) -> None:
    """Print what `_table` returned (several, separated by a blank line, when given a list)."""
    parts = renderable if isinstance(renderable, list) else [renderable]
    if all(isinstance(part, str) for part in parts):
        click.echo("\n\n".join(parts))
        return
    from rich.console import Group

    console().print(Group(*parts))


def _status_tables(database: Database, batch_id: str | None) -> tuple[Any, int]:
    """What `graftq status` prints (see `_print`), and how many shown jobs are unfinished."""
    from db.queries import running_jobs, status_counts
    from db.tables import utcnow

    with database.read() as session:
        batches = status_counts(session, batch_id)
        running = running_jobs(session, batch_id)
    if batch_id is not None and not batches:
        raise click.BadParameter(f"no batch with id {batch_id!r}", param_hint="BATCH_ID")
    unfinished = sum(b.total - b.finished for b in batches)
    if not batches and not running:
        return "no batches yet: `graftq submit BATCH` or `graftq run BATCH`", unfinished
    parts = [_table(
        ("batch", "name", "created", "jobs", *STATUSES),
        [(batch.batch_id, batch.name, _fmt(batch.created_at), str(batch.total),
          *(str(batch.counts.get(s, 0)) for s in STATUSES)) for batch in batches],
        right={"jobs", *STATUSES}, title="batches",
    )]
    if running:
        now = utcnow()
        rows = []
        for job in running:
            elapsed = (now - job.started_at).total_seconds() if job.started_at else 0.0
            step = f"{job.progress_step}/{job.progress_total}" if job.progress_total else "-"
            age = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else None
            rows.append((job.id, job.task, job.extension, job.worker or "-", job.progress_phase or "-", step,
                         _fmt(job.progress_loss), duration(job_eta(job.progress_step, job.progress_total, elapsed)),
                         f"{age:.0f} s ago" if age is not None else "-"))
        parts.append(_table(("job", "task", "extension", "worker", "phase", "step", "loss", "eta", "heartbeat"),
                            rows, title="running"))
    return parts, unfinished


@cli.command()
@click.argument("batch_id", required=False)
@click.option("--watch", is_flag=True, help="Refresh until every job of the shown batches has finished.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes with --watch.")
@click.pass_context
@_handle_db_errors
def status(ctx: click.Context, batch_id: str | None, watch: bool, interval: float) -> None:
    """Job counts by status per batch (the 20 newest, or BATCH_ID), and running jobs' progress."""
    database = _state(ctx).database
    if batch_id is not None:
        from db.queries import resolve_id

        with database.read() as session:
            batch_id = resolve_id(session, batch_id, batch=True) or batch_id
    shown, unfinished = _status_tables(database, batch_id)
    if watch and _is_terminal():
        from rich.console import Group
        from rich.live import Live

        def renderable(parts: Any) -> Any:
            return Group(*parts) if isinstance(parts, list) else parts

        with Live(renderable(shown), console=console(), auto_refresh=False) as live:
            while unfinished:
                time.sleep(interval)
                shown, unfinished = _status_tables(database, batch_id)
                live.update(renderable(shown), refresh=True)
        return
    _print(shown)
    while watch and unfinished:
        time.sleep(interval)
        shown, unfinished = _status_tables(database, batch_id)
        click.echo()
        _print(shown)


def _sort_option(value: str) -> tuple[str, bool]:
    descending = value.startswith("-")
    return value.lstrip("-"), descending


def _statuses(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """`--status`: a comma list of statuses, or `all` (no filter, given as ())."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names == ["all"]:
        return ()
    unknown = [name for name in names if name not in STATUSES]
    if unknown or not names:
        raise click.BadParameter(f"{value!r}: give statuses from {', '.join(STATUSES)} (comma-separated), or all")
    return tuple(dict.fromkeys(names))


def _parse_each(values: Sequence[str], parse: Callable[[str], Any], option: str) -> list[Any]:
    parsed = []
    for value in values:
        try:
            parsed.append(parse(value))
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint=option) from None
    return parsed


def _check_param_keys(connection: Any, keys: Sequence[str], option: str) -> None:
    """Refuse a key without a dot that is neither a result field nor any job's param (a typo of a
    field, most likely); note on stderr a dotted key that no job has, which matches nothing."""
    from db.conditions import COLUMN_KEYS, metric_name
    from db.queries import metric_names_in_use, param_keys_in_use

    keys = [key for key in dict.fromkeys(keys) if key not in COLUMN_KEYS]
    metrics = {name for key in keys if (name := metric_name(key))}
    for name in sorted(metrics - metric_names_in_use(connection, metrics)):
        click.echo(f"note: no job has the task metric {name!r} ({option} metric.{name} matches no job)", err=True)
    keys = [key for key in keys if not metric_name(key)]
    if not keys:
        return
    unused = [key for key in keys if key not in param_keys_in_use(connection, keys)]
    for key in unused:
        if "." not in key:
            raise click.BadParameter(f"unknown key {key!r}: not a result field ({', '.join(COLUMN_KEYS)}) and no "
                                     "job has such a param; params keys are dotted spec paths such as lora.r",
                                     param_hint=option)
        click.echo(f"note: no job has the param {key!r} ({option} {key} matches no job)", err=True)


def _param_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The params keys of `rows` that are not result fields of their own, sorted."""
    from db.conditions import COLUMN_KEYS

    return sorted({key for row in rows for key in (row["params"] or {}) if key not in COLUMN_KEYS})


def _param_cell(row: dict[str, Any], key: str) -> Any:
    from db.conditions import mapping_value

    return mapping_value(row, key)


def _metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """`metric.<name>` for each task metric that one of `rows` has, sorted."""
    from db.conditions import METRIC_PREFIX

    return sorted({METRIC_PREFIX + name for row in rows for name in (row["metrics"] or {})})


@cli.command()
@click.option("--batch", "batch", metavar="ID|NAME", help="Only this batch (id or name).")
@click.option("--task", metavar="NAME", help="Only jobs of this task.")
@click.option("--extension", type=click.Choice(list(EXTENSION_KINDS)), help="Only this extension kind.")
@click.option("--status", "status_", metavar="S1,S2|all", callback=_statuses,
              help=f"Only jobs with these statuses ({', '.join(STATUSES)}), or all. [default: all; with "
                   "--group-by/--agg: succeeded]")
@click.option("--where", "where", multiple=True, metavar="KEY<OP>VALUE",
              help="Only jobs for which KEY OP VALUE holds; repeatable (all must hold). OP: = != < <= > >=. "
                   "KEY: a result field (numbers compare as numbers) or a params key such as lora.r or "
                   "train.learning_rate (as numbers when both sides are). A job with no value for KEY never "
                   "matches. E.g. --where lora.r=8 --where 'train.learning_rate<0.001' --where status!=failed")
@click.option("--group-by", "group_by", metavar="KEYS",
              help="One row per combination of these result fields / params keys (comma list, e.g. "
                   "task,extension,lora.r), with the --agg aggregates; groups sorted by KEYS, nulls last.")
@click.option("--agg", "agg", multiple=True, metavar="FIELD:AGG[,AGG]",
              help="Aggregate a numeric result field over each group; AGG: mean, std, min, max, count; "
                   "repeatable. Nulls are ignored: count counts non-null values, std is the sample standard "
                   "deviation (n-1; empty below two values). [default: eval_loss:mean,std,min,count]")
@click.option("--limit", type=click.IntRange(min=1),
              help=f"At most this many rows (groups with --group-by). [default for the table: {TABLE_DEFAULT_LIMIT}, "
                   "the newest with the default sort; none for json/csv or groups]")
@click.option("--sort", "sort", default="created_at", show_default=True, metavar="FIELD",
              help="Sort by FIELD (e.g. train_loss, eval_loss, trainable_params, train_seconds; with --group-by a "
                   "group key or an aggregate column such as eval_loss_mean); prefix with '-' or pass --desc for "
                   "descending. Missing values sort last.")
@click.option("--desc", is_flag=True, help="Sort descending.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.pass_context
@_handle_db_errors
def results(ctx: click.Context, batch: str | None, task: str | None, extension: str | None,
            status_: tuple[str, ...] | None, where: tuple[str, ...], group_by: str | None, agg: tuple[str, ...],
            limit: int | None, sort: str, desc: bool, fmt: str) -> None:
    """Query recorded jobs: statistics, metrics, artifact paths and the params that made them.

    The table shows at most 50 rows unless --limit is given (the newest jobs with the default
    sort) and says when more match; json and csv print every matching job. Each params key
    (a matrix value such as lora.r) is a column of its own.

    With --group-by (or --agg) it prints one row per group instead, with the aggregates
    (json: one object per group with the keys and `<field>_<agg>` fields). Grouped results
    count only succeeded jobs unless --status says otherwise.
    """
    from db.conditions import Condition

    conditions = _parse_each(where, Condition.parse, "--where")
    if group_by is not None or agg:
        _grouped_results(ctx, batch=batch, task=task, extension=extension, status=status_, conditions=conditions,
                         group_by=group_by, agg=agg, limit=limit, sort=sort, desc=desc, fmt=fmt)
        return
    from db.conditions import metric_name
    from db.queries import result_rows
    from db.tables import NUMERIC_FIELDS, RESULT_FIELDS, SORTABLE_COLUMNS

    field, descending = _sort_option(sort)
    descending = descending or desc
    if field not in SORTABLE_COLUMNS and not metric_name(field):
        raise click.BadParameter(f"cannot sort by {field!r}; choose one of {', '.join(SORTABLE_COLUMNS)} or a "
                                 "task metric (e.g. metric.accuracy)", param_hint="--sort")
    # A table is read by a person: without --limit it shows the newest jobs, not all of them.
    capped = fmt == "table" and limit is None
    newest = capped and field == "created_at" and not descending
    if capped:
        limit = TABLE_DEFAULT_LIMIT + 1  # one more than shown: whether the footer is needed
    filters = {"batch": batch, "task": task, "extension": extension, "status": status_ or None, "where": conditions}
    database = _state(ctx).database
    with database.read() as connection:
        _check_param_keys(connection, [c.key for c in conditions], "--where")
        # The newest N in ascending order: the first N of the descending order, reversed.
        rows = result_rows(connection, **filters, limit=limit, sort=field, descending=descending != newest)
    if fmt == "json":
        click.echo(json.dumps([{k: _iso(v) for k, v in row.items()}
                               | {"params": row["params"] or {}, "metrics": row["metrics"] or {},
                                  "eval_sets": row["eval_sets"] or {}}
                               for row in rows], indent=2))
        return
    if fmt == "csv":
        from db.conditions import as_text

        fixed = [key for key in RESULT_FIELDS if key not in ("params", "metrics")]
        param_keys = _metric_columns(rows) + _param_columns(rows)
        _write_csv(fixed + param_keys, (
            [_iso(row[key]) for key in fixed] + [_param_cell(row, key) for key in param_keys] for row in rows
        ), as_text)
        return
    if not rows:
        click.echo("no matching jobs")
        return
    more = capped and len(rows) > TABLE_DEFAULT_LIMIT
    if more:
        rows = rows[:TABLE_DEFAULT_LIMIT]
    if newest:
        rows.reverse()
    _print_results_table(rows, NUMERIC_FIELDS)
    if more:
        which = "newest" if newest else "first"
        click.echo(f"(the {which} {TABLE_DEFAULT_LIMIT} matching jobs; more match: --limit N shows more, "
                   "--format csv or --format json shows them all)", err=True)


def _write_csv(columns: Sequence[str], rows: Iterator[list[Any]], text: Callable[[Any], str]) -> None:
    """CSV on stdout: empty cells for nulls; strings as they are, other values as `text` spells them."""
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if value is None else value if isinstance(value, str | int | float) and not
                         isinstance(value, bool) else text(value) for value in row])


def _print_results_table(rows: Sequence[dict[str, Any]], numeric: Collection[str]) -> None:
    """The results table: the fixed columns (and `name` when a job has one), then one per task metric
    (`metric.<name>`) and one per params key."""
    from db.conditions import as_number

    columns = list(TABLE_COLUMNS)
    if any(row["name"] for row in rows):
        columns.insert(columns.index("task") + 1, "name")
    param_keys = _metric_columns(rows) + _param_columns(rows)
    right = set(numeric) | {key for key in param_keys if all(
        as_number(value) is not None for row in rows if (value := _param_cell(row, key)) is not None)}
    _print(_table(columns + param_keys,
                  [[_fmt(row[c]) for c in columns] + [_fmt_value(_param_cell(row, key)) for key in param_keys]
                   for row in rows], right=right))


def _fmt_value(value: Any) -> str:
    """A params value or group key in a table: lists and mappings as JSON, the rest as `_fmt` has it."""
    return json.dumps(value) if isinstance(value, list | dict) else _fmt(value)


def _grouped_results(ctx: click.Context, *, batch: str | None, task: str | None, extension: str | None,
                     status: tuple[str, ...] | None, conditions: list[Any], group_by: str | None,
                     agg: tuple[str, ...], limit: int | None, sort: str, desc: bool, fmt: str) -> None:
    """`graftq results --group-by/--agg`: one row per group, with the aggregates."""
    from click.core import ParameterSource

    from db.aggregate import DEFAULT_AGGREGATES, group_rows, parse_aggregates, parse_group_keys, sort_groups
    from db.queries import result_rows

    keys = _parse_each([group_by], parse_group_keys, "--group-by")[0] if group_by is not None else []
    aggregates = [a for parsed in _parse_each(agg or [DEFAULT_AGGREGATES], parse_aggregates, "--agg") for a in parsed]
    aggregates = list(dict.fromkeys(aggregates))
    columns = keys + [aggregate.column for aggregate in aggregates]
    sort_given = ctx.get_parameter_source("sort") is not ParameterSource.DEFAULT
    field, descending = _sort_option(sort)
    if sort_given and field not in columns:
        raise click.BadParameter(f"grouped results sort by a column they show; choose one of {', '.join(columns)}",
                                 param_hint="--sort")
    statuses = ("succeeded",) if status is None else status
    filters = {"batch": batch, "task": task, "extension": extension, "status": statuses or None, "where": conditions}
    with _state(ctx).database.read() as connection:
        _check_param_keys(connection, [c.key for c in conditions], "--where")
        _check_param_keys(connection, keys, "--group-by")
        groups = group_rows(result_rows(connection, **filters), keys, aggregates)
    if sort_given:
        groups = sort_groups(groups, field, descending=descending or desc)
    groups = groups[:limit]
    if fmt == "json":
        click.echo(json.dumps([{column: _iso(value) for column, value in group.items()} for group in groups],
                              indent=2))
        return
    if fmt == "csv":
        _write_csv(columns, ([_iso(group[column]) for column in columns] for group in groups), json.dumps)
        return
    if not groups:
        click.echo("no matching jobs")
        return
    from db.conditions import as_number

    right = {column for column in columns if all(as_number(group[column]) is not None
                                                 for group in groups if group[column] is not None)}
    _print(_table(columns, [[_fmt_value(group[column]) for column in columns] for group in groups], right=right))


def _resolve_job(database: Database, job_id: str) -> str:
    from db.queries import resolve_id

    with database.read() as session:
        found = resolve_id(session, job_id)
    if found is None:
        raise click.BadParameter(f"no job with id {job_id!r} (give the id, or a unique prefix of at least 4 "
                                 "characters, as `graftq results` shows it)", param_hint="JOB_ID")
    return found


def _jobs_or_batch(database: Database, job_ids: Sequence[str], batch_id: str | None) -> tuple[str | None, list[str]]:
    """The jobs a command names: `(None, ids)` for JOB_ID arguments (ids resolved, each once), or
    `(batch id, its job ids)` for `--batch ID`; a usage error unless exactly one of the two is given."""
    from db.queries import batch_job_ids, resolve_id

    if bool(job_ids) == bool(batch_id):
        raise click.UsageError("give job ids or --batch ID (one of the two)")
    if not batch_id:
        return None, list(dict.fromkeys(_resolve_job(database, job_id) for job_id in job_ids))
    with database.read() as session:
        found = resolve_id(session, batch_id, batch=True)
        if not found:
            raise click.BadParameter(f"no batch with id {batch_id!r}", param_hint="--batch")
        return found, batch_job_ids(session, found)


def _cut(text: str, limit: int = 200) -> str:
    """`text` on one line, cut to `limit` characters with an ellipsis (a sample's input can be a document)."""
    text = " ".join(text.split()) if "\n" in text or "\r" in text else text
    return text if len(text) <= limit else text[:limit - 1] + "…"


@cli.command()
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
@_handle_db_errors
def show(ctx: click.Context, job_id: str, fmt: str) -> None:
    """One job in full: spec, params, statistics, metrics, sample predictions of its eval split, artifact
    paths, error and traceback, and the earlier runs of a retried job (history)."""
    from db.queries import get_job, loss_curve, metric_curve
    from db.tables import FIELDS, SHOW_SECTIONS

    database = _state(ctx).database
    job_id = _resolve_job(database, job_id)
    with database.read() as connection:
        job = get_job(connection, job_id)
        assert job is not None
        record = {field.name: getattr(job, field.name) for field in FIELDS}
        record.update(
            versions=job.versions, spec=job.spec, traceback=job.traceback,
            progress={"phase": job.progress_phase, "step": job.progress_step, "total": job.progress_total,
                      "loss": job.progress_loss},
            loss_curve=[{"step": s, "split": sp, "loss": loss} for s, sp, loss in loss_curve(connection, job_id)],
            metric_curve={name: [{"step": step, "value": value} for step, value in points]
                          for name, points in metric_curve(connection, job_id).items()},
        )
    record.update(params=record["params"] or {}, metrics=record["metrics"] or {}, history=record["history"] or [],
                  samples=record["samples"] or [], eval_sets=record["eval_sets"] or {})
    if fmt == "json":
        click.echo(json.dumps({k: _iso(v) for k, v in record.items()}, indent=2))
        return
    for title, keys in SHOW_SECTIONS.items():
        click.echo(f"{title}:")
        for key in keys:
            if key != "params":
                click.echo(f"  {key:<18} {_fmt(record[key])}")
        if title == "job" and record["params"]:
            width = max(18, *(len(key) for key in record["params"]))
            click.echo("params:\n" + "\n".join(f"  {key:<{width}} {_fmt_value(value)}"
                                                for key, value in sorted(record["params"].items())))
    if record["status"] == "running":
        progress = record["progress"]
        click.echo(f"progress:\n  {progress['phase'] or '-'} step {_fmt(progress['step'])}/{_fmt(progress['total'])} "
                   f"loss {_fmt(progress['loss'])}")
    if record["metrics"]:
        click.echo("task metrics:\n" + "\n".join(f"  {name:<18} {_fmt(value)}"
                                                  for name, value in sorted(record["metrics"].items())))
    if record["eval_sets"]:
        click.echo("eval sets:")
        for name, values in sorted(record["eval_sets"].items()):
            click.echo(f"  {name:<18} " + "  ".join(f"{key} {_fmt(value)}" for key, value in values.items()))
    if record["samples"]:
        click.echo("samples:")
        for sample in record["samples"]:
            for key in ("input", "target", "prediction"):
                click.echo(f"  {key:<10} {_cut(str(sample.get(key, '')))}")
    if record["versions"]:
        click.echo("versions:\n" + "".join(f"  {k:<18} {v}\n" for k, v in record["versions"].items()).rstrip("\n"))
    click.echo("spec:\n  " + json.dumps(record["spec"], sort_keys=True))
    if record["loss_curve"]:
        points = record["loss_curve"]
        shown = ", ".join(f"{p['split']}@{p['step']}={p['loss']:.4g}" for p in points[:20])
        more = f" ... ({len(points)} points)" if len(points) > 20 else ""
        click.echo(f"loss curve:\n  {shown}{more}")
    if record["metric_curve"]:
        click.echo("metric curves:")
        for name, points in sorted(record["metric_curve"].items()):
            shown = ", ".join(f"{p['step']}={p['value']:.4g}" for p in points[:20])
            more = f" ... ({len(points)} points)" if len(points) > 20 else ""
            click.echo(f"  {name}: {shown}{more}")
    if record["error"]:
        click.echo(f"error:\n  {record['error']}")
    if record["traceback"]:
        click.echo("traceback:\n" + record["traceback"].rstrip())
    if record["history"]:
        click.echo("history (earlier runs, oldest first):")
        for number, run in enumerate(record["history"], 1):
            click.echo(f"  {number}. {run.get('status')} after {run.get('attempts')} attempt(s) on "
                       f"{run.get('worker') or '-'}, {run.get('started_at') or '-'} .. {run.get('finished_at') or '-'}")
            if run.get("error"):
                click.echo(f"     error: {run['error']}")


@cli.command()
@click.argument("job_ids", nargs=-1, metavar="JOB_ID...")
@click.option("--batch", "batch_id", metavar="ID", help="Cancel every unfinished job of this batch.")
@click.pass_context
@_handle_db_errors
def cancel(ctx: click.Context, job_ids: tuple[str, ...], batch_id: str | None) -> None:
    """Cancel jobs: queued and waiting jobs never start; running jobs stop at their next step.

    The jobs waiting for a cancelled job are skipped.
    """
    from db.queries import request_cancel

    database = _state(ctx).database
    found, ids = _jobs_or_batch(database, job_ids, batch_id)
    with database.begin() as session:
        outcome = request_cancel(session, ids)
    counts: dict[str, int] = {}
    for job_id, what in outcome.items():
        counts[what] = counts.get(what, 0) + 1
        if not batch_id:
            click.echo(f"{job_id}: {what}")
    if batch_id:
        click.echo(f"batch {found}: " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))


# --- report ------------------------------------------------------------------------------------


@cli.command()
@click.argument("batch_refs", nargs=-1, metavar="[BATCH]...")
@click.option("--all", "all_batches", is_flag=True, help="Every batch of the database (default: the newest one).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="The HTML file to write.")
@click.option("--status", "status_", metavar="S1,S2|all", callback=_statuses,
              help=f"Only jobs with these statuses ({', '.join(STATUSES)}), or all. [default: all; only succeeded "
                   "jobs are plotted, the others are listed]")
@click.option("--where", "where", multiple=True, metavar="KEY<OP>VALUE",
              help="Only jobs for which KEY OP VALUE holds, as for `graftq results`; repeatable.")
@click.option("--metric", default="eval_loss", show_default=True, metavar="NAME",
              help="What the scatter, heatmaps and seed summary compare: a numeric result field (eval_loss, "
                   "train_loss, train_seconds, ...) or a task metric (exact_match, accuracy, ...).")
@click.option("--maximize/--minimize", "maximize", default=None,
              help="Whether higher values of --metric are better. [default: known from the name: losses and "
                   "times lower, accuracy-like metrics higher]")
@click.pass_context
@_handle_db_errors
def report(ctx: click.Context, batch_refs: tuple[str, ...], all_batches: bool, out: Path,
           status_: tuple[str, ...] | None, where: tuple[str, ...], metric: str, maximize: bool | None) -> None:
    """Write one self-contained HTML page comparing the jobs of some batches (ids, unique id
    prefixes or names; default: the newest batch).

    Per batch: a parameter-efficiency table (base, trainable, % of base, hybrid ÷ LoRA and
    hybrid ÷ layer), loss curves per task and extension, METRIC versus trainable parameters
    with the Pareto front, a heatmap when the jobs vary two params keys besides train.seed,
    and mean ± std over seeds per group. Failed and unfinished jobs are listed, not plotted.
    The page needs no network: its charts are inline SVG.
    """
    from db.conditions import Condition
    from db.queries import find_batches, loss_curves, metric_curves, result_rows

    if batch_refs and all_batches:
        raise click.UsageError("give BATCH arguments or --all, not both")
    try:
        from jobs.report import BatchData, Metric, metric_direction, render_report
    except ImportError as error:
        raise click.ClickException(f"graftq report needs matplotlib ({error}); install it with "
                                   "pip install 'graftq[report]'") from None
    if maximize is None:
        maximize = metric_direction(metric)
        if maximize is None:
            raise click.BadParameter(f"not known whether a higher {metric!r} is better; add --maximize or "
                                     "--minimize", param_hint="--metric")
    conditions = _parse_each(where, Condition.parse, "--where")
    with _state(ctx).database.read() as connection:
        _check_param_keys(connection, [c.key for c in conditions], "--where")
        found: dict[str, Any] = {}
        for reference in batch_refs:
            matches = find_batches(connection, reference)
            if not matches:
                raise click.BadParameter(f"no batch with id or name {reference!r} (`graftq status` lists them)",
                                         param_hint="BATCH")
            found.update((row.id, row) for row in matches)
        if not batch_refs:
            every = find_batches(connection)
            found = {row.id: row for row in (every if all_batches else every[-1:])}
        sections = []
        for batch in sorted(found.values(), key=lambda row: (row.created_at, row.id)):
            rows = result_rows(connection, batch=batch.id, status=status_ or None, where=conditions)
            succeeded = [row["id"] for row in rows if row["status"] == "succeeded"]
            sections.append(BatchData(batch.id, batch.name, batch.created_at, rows, loss_curves(connection, succeeded),
                                      metric_curves(connection, succeeded)))
    page = render_report(sections, Metric(metric, maximize))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(out)  # a reader never sees half a page
    job_count = sum(len(section.rows) for section in sections)
    click.echo(f"wrote {out} ({len(sections)} batch(es), {job_count} job(s))")


# --- predict / export ----------------------------------------------------------------------------


def _job_directory(ctx: click.Context, job_id: str, download: Callable[[str], Path],
                   download_errors: tuple[type[Exception], ...]) -> tuple[str, Path]:
    """(full job id, the artifact directory of a succeeded job): the one the database records, or,
    where that path is not on this host, the same job under --artifacts-dir. Says on stderr which.
    An `s3://` directory is `download`ed (worker.storage.local_copy), which raises `download_errors`."""
    from db.queries import get_job

    state = _state(ctx)
    job_id = _resolve_job(state.database, job_id)
    with state.database.read() as connection:
        job = get_job(connection, job_id)
    assert job is not None
    if job.status != "succeeded":
        raise click.ClickException(f"job {job_id} is {job.status}; only a job that succeeded has a model to use "
                                   "(`graftq show` it to see why, `graftq retry` to run it again)")
    candidates = [job.job_dir] if job.job_dir else []
    candidates.append(str(state.settings.artifacts_dir / job.batch_id / job_id))
    problems = []
    for candidate in candidates:
        if candidate.startswith("s3://"):
            try:
                directory = download(candidate)
            except download_errors as error:
                problems.append(str(error))
                continue
            click.echo(f"job {job_id}: artifacts from {candidate} (downloaded to {directory})", err=True)
            return job_id, directory
        if (Path(candidate) / "job.json").is_file():
            click.echo(f"job {job_id}: artifacts in {candidate}", err=True)
            return job_id, Path(candidate)
    raise click.ClickException(f"job {job_id}: its artifacts are not on this host (looked in "
                               f"{' and '.join(candidates)}{''.join(f'; {problem}' for problem in problems)}); "
                               "copy the job directory here and point --artifacts-dir (GRAFTQ_ARTIFACTS_DIR) at the "
                               f"directory that holds {job.batch_id}/{job_id}/")


@cli.command()
@click.argument("job_id")
@click.option("--input", "texts", multiple=True, metavar="TEXT", help="An input to predict for (repeatable).")
@click.option("--file", "input_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A JSONL or CSV file of inputs (its `target` column, if any, is copied to the output).")
@click.option("--column", default="input", show_default=True, help="The --file column that holds the inputs.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSONL predictions here instead of to stdout.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N|mps")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="The base model's dtype (auto: the device policy).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Generate at most N tokens. [default: the job's train.max_new_tokens, else its train.max_length]")
@click.option("--num-beams", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy/beam decoding.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), help="With --do-sample.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="With --do-sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --do-sample.")
@click.option("--scores", is_flag=True, help="For a classifier: add each label's probability.")
@click.pass_context
@_handle_db_errors
def predict(ctx: click.Context, job_id: str, texts: tuple[str, ...], input_file: Path | None, column: str,
            out: Path | None, device: str, dtype: str, batch_size: int, max_new_tokens: int | None, num_beams: int,
            do_sample: bool, temperature: float | None, top_p: float | None, seed: int, scores: bool) -> None:
    """Predict with a succeeded job's model (base + extension rebuilt from its artifacts): one JSONL
    line `{"input", "prediction"}` per input (plus `target` from --file), to stdout or --out.

    A generating job decodes greedily unless --num-beams / --do-sample say otherwise; a classifier's
    prediction is its label.
    """
    if bool(texts) == (input_file is not None):
        raise click.UsageError("give the inputs with --input TEXT (repeatable) or with --file FILE, not both")
    if (temperature is not None or top_p is not None) and not do_sample:
        raise click.UsageError("--temperature and --top-p apply to sampling; add --do-sample")
    from worker.storage import READ_ERRORS, local_copy

    job_id, job_dir = _job_directory(ctx, job_id, local_copy, READ_ERRORS)
    _require_worker_extra("predict")
    from worker.errors import JobError
    from worker.predict import GenerationSettings, Predictor, read_inputs

    try:
        rows = read_inputs(input_file, column) if input_file is not None else [{"input": text} for text in texts]
        if not rows:
            raise click.ClickException(f"--file: {input_file} holds no rows")
        predictor = Predictor.from_job_dir(job_dir, device=device, dtype=dtype)
    except JobError as error:
        raise click.ClickException(str(error)) from None
    settings = GenerationSettings(max_new_tokens=max_new_tokens or predictor.max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, seed=seed)
    many = len(rows) > batch_size

    def progress(done: int, total: int) -> None:
        if many:
            click.echo(f"predicted {done}/{total}", err=True)

    target = out.with_name(f".{out.name}.tmp") if out is not None else None
    handle = target.open("w", encoding="utf-8") if target is not None else sys.stdout
    try:
        for line in predictor.predict(rows, settings, batch_size=batch_size, scores=scores, on_batch=progress):
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    except BaseException:
        if target is not None:
            handle.close()
            target.unlink(missing_ok=True)
        raise
    if target is not None:
        handle.close()
        target.replace(out)
        click.echo(f"{len(rows)} predictions written to {out}", err=True)


@cli.command()
@click.argument("job_id")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--merge", is_flag=True,
              help="Write one standalone Hugging Face model (LoRA merged, added blocks in the model) that plain "
                   "transformers loads, instead of the artifacts as saved.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="With --merge: the dtype of the saved weights.")
@click.pass_context
@_handle_db_errors
def export(ctx: click.Context, job_id: str, out_dir: Path, merge: bool, dtype: str) -> None:
    """Export a succeeded job's model to OUT_DIR (a new directory).

    Without --merge: the PEFT adapter (`adapter/`) and the added block (`layer/`) as the job saved them,
    with a README.md on how to load them. With --merge: a model directory that
    `AutoModelFor...from_pretrained(OUT_DIR)` loads and generates with, without graftq or peft.
    """
    from worker.storage import READ_ERRORS, local_copy

    job_id, job_dir = _job_directory(ctx, job_id, local_copy, READ_ERRORS)
    from worker.errors import JobError

    try:
        if merge:
            _require_worker_extra("export --merge")
            from worker.export import export_merged

            summary = export_merged(job_dir, out_dir, dtype=dtype)
            click.echo(f"job {job_id}: merged {summary['model_class']} written to {out_dir}; load it with "
                       f"transformers.{summary['auto_class']}.from_pretrained({str(out_dir)!r})")
        else:
            from worker.export import export_artifacts

            written = export_artifacts(job_dir, out_dir)
            click.echo(f"job {job_id}: {', '.join(written)} written to {out_dir}")
    except JobError as error:
        raise click.ClickException(str(error)) from None


# --- db ------------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Manage the results database schema."""


@db.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Bring the database to the newest schema (creates the tables on an empty database)."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.session import SCHEMA_HEAD, current_revision, get_database, upgrade_to_head

    url = _state(ctx).settings.database_url
    try:
        database = get_database(url, upgrade=False)
        before = current_revision(database.engine)
        upgrade_to_head(url, database.engine)
    except SQLAlchemyError as error:
        raise click.ClickException(f"cannot upgrade the database {url!r}: {error}") from None
    if before == SCHEMA_HEAD:
        click.echo(f"database already at schema revision {SCHEMA_HEAD}")
    else:
        click.echo(f"database upgraded from revision {before or 'none'} to {SCHEMA_HEAD}")


# --- retry ---------------------------------------------------------------------------------------


def _retry_statuses(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    from db.submission import RETRYABLE_STATUSES

    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names or any(name not in RETRYABLE_STATUSES for name in names):
        raise click.BadParameter(f"{value!r}: give statuses from {', '.join(RETRYABLE_STATUSES)} (comma-separated); "
                                 "succeeded and unfinished jobs are never retried")
    return names


def _queues_for(settings: Settings, specs: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The pool queue each stored spec's device asks for, and the jobs whose spec no longer validates."""
    from pydantic import ValidationError

    from jobs.spec import JobSpec

    queues: dict[str, str] = {}
    invalid: dict[str, str] = {}
    for job_id, spec in specs.items():
        try:
            queues[job_id] = settings.queue_for(JobSpec.model_validate(spec).queue_kind)
        except ValidationError as error:
            invalid[job_id] = str(error).replace("\n", " ")
    return queues, invalid


def _refusal(status: str, statuses: Sequence[str]) -> str:
    if status == "missing":
        return "not retried: no such job"
    if status == "succeeded":
        return "not retried: it succeeded (only failed, cancelled and skipped jobs are retried)"
    if status in ("waiting", "queued", "running"):
        return f"not retried: it is {status}, not finished (cancel it first: `graftq cancel`)"
    return f"not retried: it is {status}, and --status asks for {','.join(statuses)}"


@cli.command()
@click.argument("job_ids", nargs=-1, metavar="JOB_ID...")
@click.option("--batch", "batch_id", metavar="ID", help="Retry the jobs of this batch that have a --status.")
@click.option("--status", "statuses", default="failed,cancelled,skipped", show_default=True, metavar="S1,S2",
              callback=_retry_statuses, help="Which finished jobs to retry: failed, cancelled and/or skipped.")
@click.pass_context
@_handle_db_errors
def retry(ctx: click.Context, job_ids: tuple[str, ...], batch_id: str | None, statuses: tuple[str, ...]) -> None:
    """Put finished jobs that did not succeed back in the queue, with a fresh attempt budget.

    A retried job is `queued` again, or `waiting` while a job it needs has not succeeded. Its
    earlier run (status, error, attempts, worker, times) is kept in its history (`graftq show`).
    Succeeded and unfinished jobs are refused, one line each. Jobs recorded by `graftq run` go to
    the queue their device asks for, so a `graftq worker` pool runs them. Nothing is written when
    the broker cannot be reached.
    """
    from db.queries import skipped_dependants, specs_without_queue
    from db.submission import retry_jobs
    from jobs.errors import BrokerUnavailable
    from jobs.submit import check_broker

    state = _state(ctx)
    database = state.database
    found, ids = _jobs_or_batch(database, job_ids, batch_id)
    try:
        check_broker(state.celery)
    except BrokerUnavailable as error:
        raise click.ClickException(f"nothing was retried: {error}") from None
    with database.read() as session:
        queues, invalid = _queues_for(state.settings, specs_without_queue(session, ids, statuses))
    with database.begin() as session:
        retried = retry_jobs(session, [job_id for job_id in ids if job_id not in invalid], statuses=statuses,
                             queues=queues)
        skipped = skipped_dependants(session, [*retried.queued, *retried.waiting])
    unpublished = _publish_retried(state, retried.queued)
    _report_retry(retried, ids, invalid, statuses, batch_id=found)
    if skipped:
        again = f"--batch {found} --status skipped" if found else " ".join(skipped)
        click.echo(f"{len(skipped)} skipped job(s) need the retried ones and stay skipped; retry them too: "
                   f"graftq retry {again}", err=True)
    moved = sorted(set(queues) & (set(retried.queued) | set(retried.waiting)))
    if moved:
        click.echo(f"{len(moved)} job(s) recorded by `graftq run` go to the worker pool's queues "
                   f"({', '.join(sorted({queues[job_id] for job_id in moved}))}): start `graftq worker` to run them",
                   err=True)
    if unpublished:
        raise click.ClickException(unpublished)


def _report_retry(retried: Any, ids: Sequence[str], invalid: dict[str, str], statuses: Sequence[str], *,
                  batch_id: str | None) -> None:
    """One line per job asked for (counts for a batch), and one per job that could not be retried."""
    for job_id, problem in invalid.items():
        click.echo(f"{job_id}: not retried: its stored spec no longer validates: {problem}")
    for job_id, needed in retried.blocked.items():
        click.echo(f"{job_id}: not retried: it needs {', '.join(needed)}, which did not succeed and is not "
                   "retried with it; retry them together")
    if batch_id is not None:
        left: dict[str, int] = {}
        for status in retried.refused.values():
            left[status] = left.get(status, 0) + 1
        click.echo(f"batch {batch_id}: {len(retried.queued)} queued, {len(retried.waiting)} waiting"
                   + ("; left as they are: " + ", ".join(f"{n} {status}" for status, n in sorted(left.items()))
                      if left else ""))
        return
    for job_id in ids:
        if job_id in retried.queued:
            click.echo(f"{job_id}: queued")
        elif job_id in retried.waiting:
            click.echo(f"{job_id}: waiting for {', '.join(retried.waiting[job_id])} to succeed")
        elif job_id in retried.refused:
            click.echo(f"{job_id}: {_refusal(retried.refused[job_id], statuses)}")


def _publish_retried(state: State, queued: dict[str, str | None]) -> str | None:
    """Publish the retried jobs' messages; returns what to tell the user when the broker failed."""
    from db.queries import job_priorities
    from db.submission import mark_published
    from jobs.submit import PublishFailed, publish_jobs

    if not queued:
        return None
    with state.database.read() as session:
        priorities = job_priorities(session, list(queued))
    try:
        sent = publish_jobs(state.celery, list(queued), list(queued.values()),
                            [priorities.get(job_id, 0) for job_id in queued])
        failure = None
    except PublishFailed as error:
        sent, failure = error.sent, error
    if sent:
        with state.database.begin() as session:
            mark_published(session, sent)
    if failure is None:
        return None
    return (f"the broker failed after {len(sent)} of {len(queued)} retried jobs were enqueued ({failure.error}); "
            "the others are queued in the database and a running `graftq worker` publishes them once the "
            "broker is back")


def iter_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path (`("db", "upgrade")`, ...), for tests and docs."""
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from iter_commands(command, (*prefix, name))


def main() -> None:
    cli(prog_name="graftq")


if __name__ == "__main__":
    main()
