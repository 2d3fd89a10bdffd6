"""Schema migrations (Alembic), imported only when a database needs upgrading.

`graftq db upgrade` and the automatic upgrade of a new SQLite file both end here; the
repository's `alembic.ini` points the `alembic` command at the same scripts.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that needs no alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser's interpolation character; escape it for URLs with encoded passwords.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The head revision of the migration scripts."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    # Several processes may open a new SQLite file at once (a CLI and workers); one migrates.
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


def upgrade_to_head(url: str, engine: Engine) -> None:
    """Bring the database at `url` to the head revision, on `engine`'s connection."""
    from db.session import SCHEMA_HEAD, current_revision, sqlite_path

    with _file_lock(sqlite_path(url)):
        if current_revision(engine) == SCHEMA_HEAD:
            return
        config = alembic_config(url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
