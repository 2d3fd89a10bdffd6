"""The `graftq` command line (click).

The root group owns the connection options and puts a `State` with lazily built
settings, database and Celery app on `ctx.obj`; commands are thin. Heavy modules are
imported inside the commands that need them: `--help`, `submit --dry-run`, `results` and
`status` never import torch/transformers/peft, and only commands that talk to the broker
import Celery.
"""

from __future__ import annotations

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

    def __init__(self, database_url: str | None, broker_url: str | None, artifacts_dir: Path | None):
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
              type=click.Path(file_okay=False, path_type=Path),
              help="Where job artifacts are written. [env: GRAFTQ_ARTIFACTS_DIR; default: ./graftq-data/artifacts]")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, broker_url: str | None, artifacts_dir: Path | None) -> None:
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
@click.option("--help-keys", is_flag=True, expose_value=False, is_eager=True, callback=_print_key_reference,
              help="Describe every batch-file key and exit.")
@click.pass_context
@_handle_db_errors
def submit(ctx: click.Context, batch_file: Path, dry_run: bool) -> None:
    """Validate BATCH, record its jobs as queued and enqueue them on the broker.

    Prints the batch id. Nothing is recorded or enqueued when the batch file has an
    error or the broker cannot be reached.
    """
    from jobs.errors import BrokerUnavailable, SpecError
    from jobs.submit import check_broker, check_pool_devices, submit_batch

    state = _state(ctx)
    batch = _load(batch_file)
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
    except BrokerUnavailable as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"submitted batch {submitted.batch_id} ({batch.name}): {len(submitted.job_ids)} jobs queued; "
               f"follow it with `graftq status {submitted.batch_id}`", err=True)
    click.echo(submitted.batch_id)


def _print_dry_run(batch: Batch, settings: Settings) -> None:
    click.echo(f"batch {batch.name!r}: {len(batch.jobs)} jobs (dry run: nothing recorded or enqueued)")
    for index, spec in enumerate(batch.jobs):
        click.echo(f"[{index}] task={spec.task} kind={spec.kind.value} extension={spec.extension} "
                   f"base_model={spec.base_model} device={spec.device} queue={settings.queue_for(spec.queue_kind)}")
        click.echo("    " + json.dumps(spec.to_json(), sort_keys=True))


@cli.command()
@click.argument("batch_file", metavar="BATCH", type=click.Path(path_type=Path))
@click.option("--max-steps", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train each train job for at most N steps (N wins over `epochs`): a quick smoke test of "
                   "a batch. The recorded specs say N.")
@click.pass_context
@_handle_db_errors
def run(ctx: click.Context, batch_file: Path, max_steps: int | None) -> None:
    """Run every job of BATCH on this machine (no broker needed), with live progress.

    The jobs are recorded in the results database and executed one after another
    through the same task code as on a worker pool. Exits 0 only if every job succeeded.
    """
    from worker.runner import run_batch

    state = _state(ctx)
    batch = _load(batch_file)
    if max_steps is not None:
        batch = _with_max_steps(batch, max_steps)
    _require_worker_extra("run")
    ok = run_batch(batch, state.settings, state.database)
    ctx.exit(0 if ok else 1)


def _with_max_steps(batch: Batch, max_steps: int) -> Batch:
    """`batch` with every train job's `train.max_steps` capped at `max_steps`."""
    import dataclasses

    def capped(spec: JobSpec) -> JobSpec:
        if spec.train is None or (spec.train.max_steps is not None and spec.train.max_steps <= max_steps):
            return spec
        return spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": max_steps})})

    return dataclasses.replace(batch, jobs=[capped(spec) for spec in batch.jobs])


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
@click.pass_context
def worker(ctx: click.Context, gpus: str, queues: str | None, loglevel: str, reap_interval: float,
           max_restarts: int) -> None:
    """Serve the broker: one Celery worker process per GPU (one job at a time each), or a CPU worker.

    On SIGTERM/SIGINT a training job saves a checkpoint at its next step and goes back to the
    queue (another worker resumes it), then every process exits; a second signal stops them at
    once (their jobs are re-queued later by a reaper, like a dead worker's).
    A process that exits unexpectedly is restarted.
    """
    from worker.launcher import LauncherError, parse_gpus, serve

    state = _state(ctx)
    try:
        selection = parse_gpus(gpus)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--gpus") from None
    _require_worker_extra("worker")
    try:
        code = serve(state.settings, selection, queues=queues, loglevel=loglevel.upper(),
                     reap_interval=reap_interval, max_restarts=max_restarts)
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


@cli.command()
@click.option("--batch", "batch", metavar="ID|NAME", help="Only this batch (id or name).")
@click.option("--task", metavar="NAME", help="Only jobs of this task.")
@click.option("--extension", type=click.Choice(list(EXTENSION_KINDS)), help="Only this extension kind.")
@click.option("--status", "status_", type=click.Choice(STATUSES), help="Only jobs with this status.")
@click.option("--limit", type=click.IntRange(min=1),
              help=f"At most this many rows. [default for the table: {TABLE_DEFAULT_LIMIT}, the newest with the "
                   "default sort; none for json/csv]")
@click.option("--sort", "sort", default="created_at", show_default=True, metavar="FIELD",
              help="Sort by FIELD (e.g. train_loss, eval_loss, trainable_params, train_seconds); "
                   "prefix with '-' or pass --desc for descending. Missing values sort last.")
@click.option("--desc", is_flag=True, help="Sort descending.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.pass_context
@_handle_db_errors
def results(ctx: click.Context, batch: str | None, task: str | None, extension: str | None,
            status_: str | None, limit: int | None, sort: str, desc: bool, fmt: str) -> None:
    """Query recorded jobs: statistics, metrics and artifact paths.

    The table shows at most 50 rows unless --limit is given (the newest jobs with the default
    sort) and says when more match; json and csv print every matching job.
    """
    from db.queries import result_rows
    from db.tables import NUMERIC_FIELDS, RESULT_FIELDS, SORTABLE_COLUMNS

    field, descending = _sort_option(sort)
    descending = descending or desc
    if field not in SORTABLE_COLUMNS:
        raise click.BadParameter(f"cannot sort by {field!r}; choose one of {', '.join(SORTABLE_COLUMNS)}",
                                 param_hint="--sort")
    # A table is read by a person: without --limit it shows the newest jobs, not all of them.
    capped = fmt == "table" and limit is None
    newest = capped and field == "created_at" and not descending
    if capped:
        limit = TABLE_DEFAULT_LIMIT + 1  # one more than shown: whether the footer is needed
    filters = {"batch": batch, "task": task, "extension": extension, "status": status_}
    database = _state(ctx).database
    with database.read() as connection:
        # The newest N in ascending order: the first N of the descending order, reversed.
        rows = result_rows(connection, **filters, limit=limit, sort=field, descending=descending != newest)
    if fmt == "json":
        click.echo(json.dumps([{k: _iso(v) for k, v in row.items()} for row in rows], indent=2))
        return
    if fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(RESULT_FIELDS), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else _iso(v) for k, v in row.items()})
        return
    if not rows:
        click.echo("no matching jobs")
        return
    more = capped and len(rows) > TABLE_DEFAULT_LIMIT
    if more:
        rows = rows[:TABLE_DEFAULT_LIMIT]
    if newest:
        rows.reverse()
    _print(_table(TABLE_COLUMNS, [[_fmt(row[c]) for c in TABLE_COLUMNS] for row in rows], right=NUMERIC_FIELDS))
    if more:
        which = "newest" if newest else "first"
        click.echo(f"(the {which} {TABLE_DEFAULT_LIMIT} matching jobs; more match: --limit N shows more, "
                   "--format csv or --format json shows them all)", err=True)


def _resolve_job(database: Database, job_id: str) -> str:
    from db.queries import resolve_id

    with database.read() as session:
        found = resolve_id(session, job_id)
    if found is None:
        raise click.BadParameter(f"no job with id {job_id!r} (give the id, or a unique prefix of at least 4 "
                                 "characters, as `graftq results` shows it)", param_hint="JOB_ID")
    return found


@cli.command()
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
@_handle_db_errors
def show(ctx: click.Context, job_id: str, fmt: str) -> None:
    """One job in full: spec, statistics, metrics, artifact paths, error and traceback."""
    from db.queries import get_job, loss_curve
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
        )
    if fmt == "json":
        click.echo(json.dumps({k: _iso(v) for k, v in record.items()}, indent=2))
        return
    for title, keys in SHOW_SECTIONS.items():
        click.echo(f"{title}:")
        for key in keys:
            click.echo(f"  {key:<18} {_fmt(record[key])}")
    if record["status"] == "running":
        progress = record["progress"]
        click.echo(f"progress:\n  {progress['phase'] or '-'} step {_fmt(progress['step'])}/{_fmt(progress['total'])} "
                   f"loss {_fmt(progress['loss'])}")
    if record["versions"]:
        click.echo("versions:\n" + "".join(f"  {k:<18} {v}\n" for k, v in record["versions"].items()).rstrip("\n"))
    click.echo("spec:\n  " + json.dumps(record["spec"], sort_keys=True))
    if record["loss_curve"]:
        points = record["loss_curve"]
        shown = ", ".join(f"{p['split']}@{p['step']}={p['loss']:.4g}" for p in points[:20])
        more = f" ... ({len(points)} points)" if len(points) > 20 else ""
        click.echo(f"loss curve:\n  {shown}{more}")
    if record["error"]:
        click.echo(f"error:\n  {record['error']}")
    if record["traceback"]:
        click.echo("traceback:\n" + record["traceback"].rstrip())


@cli.command()
@click.argument("job_ids", nargs=-1, metavar="JOB_ID...")
@click.option("--batch", "batch_id", metavar="ID", help="Cancel every unfinished job of this batch.")
@click.pass_context
@_handle_db_errors
def cancel(ctx: click.Context, job_ids: tuple[str, ...], batch_id: str | None) -> None:
    """Cancel jobs: queued jobs never start; running jobs stop at their next step."""
    from db.queries import batch_job_ids, request_cancel, resolve_id

    if bool(job_ids) == bool(batch_id):
        raise click.UsageError("give job ids or --batch ID (one of the two)")
    database = _state(ctx).database
    if batch_id:
        with database.read() as session:
            found = resolve_id(session, batch_id, batch=True)
            ids = batch_job_ids(session, found) if found else []
        if not found:
            raise click.BadParameter(f"no batch with id {batch_id!r}", param_hint="--batch")
    else:
        ids = [_resolve_job(database, job_id) for job_id in job_ids]
    with database.begin() as session:
        outcome = request_cancel(session, ids)
    counts: dict[str, int] = {}
    for job_id, what in outcome.items():
        counts[what] = counts.get(what, 0) + 1
        if not batch_id:
            click.echo(f"{job_id}: {what}")
    if batch_id:
        click.echo(f"batch {found}: " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))


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
