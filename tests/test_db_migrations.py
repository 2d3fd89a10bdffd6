"""The schema comes only from Alembic revisions, and they match the tables (`db.tables`)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, select, text

from db.session import (
    SCHEMA_HEAD,
    alembic_config,
    clear_cache,
    create_at_head,
    create_database_engine,
    current_revision,
    get_database,
    head_revision,
    upgrade_to_head,
)
from db.tables import metadata
from tests.conftest import ROOT, graftq_argv


def _diff(engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def test_schema_head_constant_matches_the_migration_scripts():
    # db.session compares the alembic_version row with this constant to skip importing alembic.
    assert SCHEMA_HEAD == head_revision()


def test_upgrade_head_on_an_empty_sqlite_file_matches_the_tables(tmp_path):
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
    assert result.stdout.strip() == "False"  # created from the tables, stamped, no revision replayed

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
def test_upgrade_head_on_postgresql_matches_the_tables(postgres_database):
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


# --- upgrading a database written by the previous release ------------------------------------------

RELEASE_FIXTURE = ROOT / "tests" / "fixtures" / "results-0.1.0.sqlite"  # see make_results_0_1_0.py beside it
RELEASE_URL = f"sqlite:///file:{RELEASE_FIXTURE}?mode=ro&uri=true"


def _release_columns() -> dict[str, list[str]]:
    """The release's tables and their columns, as its database has them."""
    with sqlite3.connect(f"file:{RELEASE_FIXTURE}?mode=ro", uri=True) as connection:
        names = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version' ORDER BY name")]
        return {name: [row[1] for row in connection.execute(f"PRAGMA table_info('{name}')")] for name in names}


def _release_revision() -> str:
    with sqlite3.connect(f"file:{RELEASE_FIXTURE}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]


#: Columns renamed since the release: (table, the release's name) -> this graftq's name.
RENAMED = {("metric_points", "loss"): "value"}


def _typed_rows(url: str, *, upgraded: bool = False) -> dict[str, list[dict]]:
    """Every row of the release's tables at `url` under the release's column names, read with this
    graftq's column types; `upgraded`: the database at `url` has this graftq's schema."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = {}
            for name, columns in _release_columns().items():
                table = metadata.tables[name]
                current = {column: table.c[RENAMED.get((name, column), column)] for column in columns}
                if upgraded:
                    selected = [current[column].label(column) for column in columns]
                else:
                    selected = [sa.column(column, current[column].type) for column in columns]
                query = (select(*selected).select_from(table if upgraded else sa.table(name))
                         .order_by(*(sa.column(key.name) for key in table.primary_key.columns)))
                rows[name] = [dict(row._mapping) for row in connection.execute(query)]
            return rows
    finally:
        engine.dispose()


def _release_table(name: str) -> sa.TableClause:
    """Table `name` as the release's schema has it, for inserting its rows."""
    table = metadata.tables[name]
    return sa.table(name, *(sa.column(column, table.c[RENAMED.get((name, column), column)].type)
                            for column in _release_columns()[name]))


def _check_upgraded(env: dict, url: str, expected: dict[str, list[dict]]) -> None:
    upgrade = subprocess.run(graftq_argv("db", "upgrade"), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    engine = create_engine(url)
    assert current_revision(engine) == SCHEMA_HEAD
    engine.dispose()
    assert _typed_rows(url, upgraded=True) == expected

    results = subprocess.run(graftq_argv("results", "--format", "json"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert results.returncode == 0, results.stderr
    listed = {row["id"]: row for row in json.loads(results.stdout)}
    jobs = {job["id"]: job for job in expected["jobs"]}
    assert listed.keys() == jobs.keys()
    for job_id, job in jobs.items():
        assert {key: listed[job_id][key] for key in ("status", "attempts", "base_params", "eval_loss", "error")} == {
            key: job[key] for key in ("status", "attempts", "base_params", "eval_loss", "error")}
    failed = next(job for job in jobs.values() if job["traceback"])
    shown = subprocess.run(graftq_argv("show", failed["id"]), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert failed["error"] in shown.stdout and failed["traceback"].strip().splitlines()[-1] in shown.stdout
    curved = next(job for job in jobs.values() if job["eval_loss"] is not None and job["steps"])
    shown = subprocess.run(graftq_argv("show", curved["id"]), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "loss curve:" in shown.stdout and curved["adapter_path"] in shown.stdout


def test_the_previous_release_fixture_holds_every_status():
    expected = _typed_rows(RELEASE_URL)
    assert {job["status"] for job in expected["jobs"]} == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert len(expected["batches"]) == 2 and len(expected["metric_points"]) > 10
    assert max(job["base_params"] or 0 for job in expected["jobs"]) > 2**32


def test_graftq_db_upgrade_keeps_every_row_of_the_previous_release_on_sqlite(tmp_path, graftq_env):
    expected = _typed_rows(RELEASE_URL)
    path = tmp_path / "graftq.db"
    shutil.copyfile(RELEASE_FIXTURE, path)
    url = f"sqlite:///{path}"
    _check_upgraded(dict(graftq_env, GRAFTQ_DATABASE_URL=url), url, expected)


@pytest.mark.postgres
def test_graftq_db_upgrade_keeps_every_row_of_the_previous_release_on_postgresql(postgres_database, graftq_env):
    from alembic import command

    expected = _typed_rows(RELEASE_URL)
    url = postgres_database
    engine = create_engine(url)
    with engine.begin() as connection:  # the release's schema, then its rows
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, _release_revision())
        for table in metadata.sorted_tables:
            if table.name in expected:  # tables added since the release start empty
                connection.execute(_release_table(table.name).insert(), expected[table.name])
        connection.execute(text("SELECT setval(pg_get_serial_sequence('metric_points', 'id'), "
                                "(SELECT max(id) FROM metric_points))"))
    engine.dispose()
    _check_upgraded(dict(graftq_env, GRAFTQ_DATABASE_URL=url), url, expected)
