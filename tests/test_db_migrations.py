"""The schema comes only from Alembic revisions, and they match the models."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from db.migrate import head_revision, upgrade_to_head
from db.models import Base
from db.session import (
    SCHEMA_HEAD,
    clear_cache,
    create_at_head,
    create_database_engine,
    current_revision,
    get_database,
)
from tests.conftest import ROOT


def _diff(engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_schema_head_constant_matches_the_migration_scripts():
    # db.session compares the alembic_version row with this constant to skip importing alembic.
    assert SCHEMA_HEAD == head_revision()


def test_upgrade_head_on_an_empty_sqlite_file_matches_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    engine = create_database_engine(url)
    assert current_revision(engine) is None
    upgrade_to_head(url, engine)
    assert current_revision(engine) == SCHEMA_HEAD
    assert _diff(engine) == []
    engine.dispose()


def test_a_new_sqlite_database_is_created_at_head_automatically(tmp_path):
    path = tmp_path / "nested" / "dir" / "graftq.db"  # the parent directories do not exist yet
    database = get_database(f"sqlite:///{path}")
    try:
        assert path.is_file()
        with sqlite3.connect(path) as connection:
            assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == (SCHEMA_HEAD,)
            assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        database.dispose()
        clear_cache()


def _sqlite_schema(path) -> dict:
    """Every table's columns, indexes and foreign keys as SQLite reports them."""
    with sqlite3.connect(path) as connection:
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        schema = {}
        for table in tables:
            indexes = {row[1]: (row[2], [info[2] for info in connection.execute(f"PRAGMA index_info('{row[1]}')")])
                       for row in connection.execute(f"PRAGMA index_list('{table}')")}
            schema[table] = {
                "columns": connection.execute(f"PRAGMA table_info('{table}')").fetchall(),
                "indexes": indexes,
                "foreign_keys": connection.execute(f"PRAGMA foreign_key_list('{table}')").fetchall(),
            }
    return schema


def test_a_new_sqlite_file_is_created_at_head_without_alembic_exactly_as_upgrade_head_builds_it(tmp_path):
    created, migrated = tmp_path / "created.db", tmp_path / "migrated.db"
    code = (
        "import sys; from db.session import get_database; get_database(sys.argv[1]); "
        "print('alembic' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, f"sqlite:///{created}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"  # created from the models, stamped, no revision replayed

    engine = create_database_engine(f"sqlite:///{migrated}")
    upgrade_to_head(f"sqlite:///{migrated}", engine)
    engine.dispose()
    assert _sqlite_schema(created) == _sqlite_schema(migrated)
    assert len(_sqlite_schema(created)["jobs"]["indexes"]) > 10  # the comparison saw the real schema

    engine = create_database_engine(f"sqlite:///{created}")
    assert current_revision(engine) == SCHEMA_HEAD
    assert _diff(engine) == []
    upgrade_to_head(f"sqlite:///{created}", engine)  # a later upgrade takes it from the stamp
    assert current_revision(engine) == SCHEMA_HEAD
    engine.dispose()


def test_an_sqlite_file_with_tables_but_no_version_is_migrated_not_recreated(tmp_path):
    path = tmp_path / "half.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    engine = create_database_engine(f"sqlite:///{path}")
    assert create_at_head(engine) is False  # not empty: left to the migrations
    engine.dispose()
    database = get_database(f"sqlite:///{path}")
    try:
        assert current_revision(database.engine) == SCHEMA_HEAD
        with sqlite3.connect(path) as connection:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"notes", "jobs", "batches", "metric_points"} <= tables
    finally:
        database.dispose()
        clear_cache()


def test_opening_an_up_to_date_database_does_not_import_alembic(tmp_path):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    get_database(url)
    clear_cache()
    code = (
        "import sys; from db.session import get_database; get_database(sys.argv[1]); "
        "print('alembic' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_alembic_command_line_upgrades_the_database_named_by_the_environment(tmp_path):
    # What the docker-compose migrate service runs, from the repository root.
    path = tmp_path / "compose.db"
    env = {"GRAFTQ_DATABASE_URL": f"sqlite:///{path}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    engine = create_engine(f"sqlite:///{path}")
    assert current_revision(engine) == SCHEMA_HEAD
    assert _diff(engine) == []
    engine.dispose()


@pytest.mark.postgres
def test_upgrade_head_on_postgresql_matches_the_models(postgres_database):
    url = postgres_database
    with pytest.raises(Exception, match="graftq db upgrade"):
        get_database(url)  # PostgreSQL is never migrated behind the operator's back
    clear_cache()
    engine = create_database_engine(url)
    upgrade_to_head(url, engine)
    assert current_revision(engine) == SCHEMA_HEAD
    assert _diff(engine) == []
    engine.dispose()
    assert get_database(url).engine.dialect.name == "postgresql"
