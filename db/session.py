"""Engines, transactions and the schema revision: one engine per process per URL, reset after a fork.

    database = get_database(url)
    with database.begin() as connection:    # a write transaction (BEGIN IMMEDIATE on SQLite)
        claim = claim_job(connection, job_id, ...)
    with database.read() as connection:     # a read transaction (plain BEGIN on SQLite)
        rows = result_rows(connection, ...)

SQLite: WAL journal, a 30 s busy timeout, and write transactions that take the write lock
up front (`BEGIN IMMEDIATE`), so that two writers queue on the busy timeout instead of one
of them failing with "database is locked" when it upgrades a read lock. A new SQLite file
is created at the Alembic head automatically (an older one is upgraded); PostgreSQL is migrated with
`graftq db upgrade` (or `alembic upgrade head`), and an outdated one is refused. Alembic is
imported only when a database needs upgrading; the repository's `alembic.ini` points the
`alembic` command at the same scripts (`db/migrations`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db.errors import DatabaseError, SchemaOutdated
from db.tables import metadata

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest Alembic revision. A test checks it against the migration scripts; comparing
#: the `alembic_version` row with this constant keeps alembic out of every CLI start.
SCHEMA_HEAD = "0003"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SQLITE_BUSY_TIMEOUT_S = 30.0
_READ_ONLY = "graftq_read_only"


class Database:
    """An engine and its transactions. Build it with `get_database(url)`."""

    def __init__(self, url: str, engine: Engine):
        self.url = url
        self.engine = engine
        self.read_engine = engine.execution_options(**{_READ_ONLY: True})

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def begin(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction: commits when the block ends, rolls back on an exception."""
        return self.engine.begin()

    def read(self) -> contextlib.AbstractContextManager[Connection]:
        """A read-only transaction: begins with the first statement, rolled back when the block ends."""
        return self.read_engine.connect()

    def dispose(self) -> None:
        self.engine.dispose()


_databases: dict[str, Database] = {}
_lock = threading.Lock()


def _reset_after_fork() -> None:
    # The child must not reuse the parent's pooled connections (shared sockets / file locks).
    # close=False drops them without closing what the parent still uses.
    for database in _databases.values():
        database.engine.dispose(close=False)
    _databases.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for another backend or an in-memory database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def create_database_engine(url: str, **engine_options: Any) -> Engine:
    """A new engine for `url` with graftq's connection settings (no schema check)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **engine_options)

    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}, **engine_options
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (below) instead of pysqlite's implicit, deferred one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if path is not None:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def current_revision(engine: Engine) -> str | None:
    """The revision in `alembic_version`, or None for a database without one.

    Raises the driver's error (wrapped by SQLAlchemy) when the database cannot be reached.
    """
    with engine.connect() as connection:
        connection = connection.execution_options(**{_READ_ONLY: True})
        try:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:  # no alembic_version table: an empty database
            return None


def get_database(url: str, *, upgrade: bool = True) -> Database:
    """The process's `Database` for `url`, created on first use.

    A SQLite database below the schema head is upgraded in place (alembic is imported only
    then). Raises `SchemaOutdated` for another backend that is not at the head, and
    `DatabaseError` when the database cannot be reached.
    """
    with _lock:
        database = _databases.get(url)
        if database is not None:
            return database
        engine = create_database_engine(url)
        database = Database(url, engine)
        if upgrade:
            _ensure_schema(database)
        _databases[url] = database
        return database


def _ensure_schema(database: Database) -> None:
    try:
        revision = current_revision(database.engine)
    except DBAPIError as error:  # pragma: no cover - connection refused etc.
        raise DatabaseError(f"cannot open the database {database.engine.url!r}: {error.orig}") from error
    if revision == SCHEMA_HEAD:
        return
    if not database.is_sqlite:
        raise SchemaOutdated(
            f"the database {database.engine.url!r} is at schema revision {revision or 'none'}, this graftq "
            f"needs {SCHEMA_HEAD}: run `graftq db upgrade` (or `alembic upgrade head`)"
        )
    with sqlite_file_lock(database.url):
        # Another process may have created it meanwhile; an empty file is created right here.
        if current_revision(database.engine) == SCHEMA_HEAD or create_at_head(database.engine):
            return
    upgrade_to_head(database.url, database.engine)


@contextlib.contextmanager
def sqlite_file_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite file (nothing for other databases).

    Several processes may open a new SQLite file at once (a CLI and workers); one creates
    or migrates its schema while the others wait.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock_path = path.with_name(path.name + ".migrate.lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: Alembic's own version table, as `alembic stamp` creates it.
_VERSION_TABLE_DDL = (
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)


def create_at_head(engine: Engine) -> bool:
    """Create the head schema in an empty database and stamp it; False if it is not empty.

    Alembic's recipe for a database built from scratch (`metadata.create_all`, then stamp the
    head) without importing Alembic: a first `graftq submit` or `graftq run` on a new SQLite
    file skips replaying every revision. A test checks that the result matches `upgrade head`.
    """
    with engine.begin() as connection:
        if inspect(connection).get_table_names():
            return False
        metadata.create_all(connection)
        connection.exec_driver_sql(_VERSION_TABLE_DDL)
        connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"), {"head": SCHEMA_HEAD})
    return True


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that needs no alembic.ini."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser's interpolation character; escape it for URLs with encoded passwords.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The head revision of the migration scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def upgrade_to_head(url: str, engine: Engine) -> None:
    """Bring the database at `url` to the head revision, on `engine`'s connection.

    `graftq db upgrade` and the automatic upgrade of an older SQLite file both end here (a new,
    empty SQLite file is created by `create_at_head` instead).
    """
    from alembic import command

    with sqlite_file_lock(url):
        if current_revision(engine) == SCHEMA_HEAD:
            return
        config = alembic_config(url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")


def clear_cache() -> None:
    """Dispose every cached engine (tests, or a long-lived process that switches URL)."""
    with _lock:
        for database in _databases.values():
            database.engine.dispose()
        _databases.clear()
