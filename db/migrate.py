"""Schema migrations (Alembic), imported only when a database needs upgrading.

`graftq db upgrade` and the automatic upgrade of an older SQLite file both end here (a new,
empty SQLite file is created at the head by `db.session.create_at_head` instead); the
repository's `alembic.ini` points the `alembic` command at the same scripts.
"""

from __future__ import annotations

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


def upgrade_to_head(url: str, engine: Engine) -> None:
    """Bring the database at `url` to the head revision, on `engine`'s connection."""
    from db.session import SCHEMA_HEAD, current_revision, sqlite_file_lock

    with sqlite_file_lock(url):
        if current_revision(engine) == SCHEMA_HEAD:
            return
        config = alembic_config(url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
