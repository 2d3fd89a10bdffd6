"""The schema comes only from Alembic revisions, and they match the tables (`db.tables`)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

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

FIXTURES = ROOT / "tests" / "fixtures"
#: Databases written by earlier releases (see the make_results_*.py scripts beside them); each
#: upgrade is tested from every one of them.
RELEASES = {"0.1.0": FIXTURES / "results-0.1.0.sqlite", "0.2.0": FIXTURES / "results-0.2.0.sqlite"}
#: Columns renamed since a release: (table, the release's name) -> this graftq's name.
RENAMED = {("metric_points", "loss"): "value"}


def _read_only(fixture: Path) -> str:
    return f"sqlite:///file:{fixture}?mode=ro&uri=true"


def _release_columns(fixture: Path) -> dict[str, list[str]]:
    """The release's tables and their columns, as its database has them."""
    with sqlite3.connect(f"file:{fixture}?mode=ro", uri=True) as connection:
        names = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version' ORDER BY name")]
        return {name: [row[1] for row in connection.execute(f"PRAGMA table_info('{name}')")] for name in names}


def _release_revision(fixture: Path) -> str:
    with sqlite3.connect(f"file:{fixture}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def _typed_rows(fixture: Path, url: str, *, upgraded: bool = False) -> dict[str, list[dict]]:
    """Every row of the release's tables at `url` under the release's column names, read with this
    graftq's column types; `upgraded`: the database at `url` has this graftq's schema."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = {}
            for name, columns in _release_columns(fixture).items():
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


def _release_table(fixture: Path, name: str) -> sa.TableClause:
    """Table `name` as the release's schema has it, for inserting its rows."""
    table = metadata.tables[name]
    return sa.table(name, *(sa.column(column, table.c[RENAMED.get((name, column), column)].type)
                            for column in _release_columns(fixture)[name]))


def _graftq(env: dict, *args: str) -> str:
    done = subprocess.run(graftq_argv(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _check_upgraded(fixture: Path, env: dict, url: str, expected: dict[str, list[dict]]) -> None:
    _graftq(env, "db", "upgrade")
    engine = create_engine(url)
    assert current_revision(engine) == SCHEMA_HEAD
    with engine.connect() as connection:  # what the release knew nothing of gets the defaults
        assert set(connection.execute(select(metadata.tables["jobs"].c.priority, metadata.tables["jobs"].c.gpus))
                   .all()) == {(0, 1)}
        assert set(connection.scalars(select(metadata.tables["metric_points"].c.metric))) <= {"loss"}
    engine.dispose()
    assert _typed_rows(fixture, url, upgraded=True) == expected

    listed = {row["id"]: row for row in json.loads(_graftq(env, "results", "--format", "json"))}
    jobs = {job["id"]: job for job in expected["jobs"]}
    assert listed.keys() == jobs.keys()
    kept = [key for key in ("status", "attempts", "base_params", "eval_loss", "error", "params", "metrics",
                            "head_params") if key in expected["jobs"][0]]
    for job_id, job in jobs.items():
        # `results` shows a job without params or task metrics as `{}`
        assert {key: listed[job_id][key] for key in kept} == {
            key: {} if key in ("params", "metrics") and job[key] is None else job[key] for key in kept}
        assert listed[job_id]["best_step"] is None and listed[job_id]["eval_sets"] in ({}, None)
    failed = next((job for job in jobs.values() if job["traceback"]), None)
    if failed is not None:
        shown = _graftq(env, "show", failed["id"])
        assert failed["error"] in shown and failed["traceback"].strip().splitlines()[-1] in shown
    curved = next(job for job in jobs.values() if job["eval_loss"] is not None and job["steps"])
    shown = _graftq(env, "show", curved["id"])
    assert "loss curve:" in shown and (curved["adapter_path"] or curved["layer_path"]) in shown
    retried = next((job for job in jobs.values() if job.get("history")), None)
    if retried is not None:
        assert retried["history"][0]["error"] in _graftq(env, "show", retried["id"])


def test_the_release_fixtures_hold_every_status():
    old = _typed_rows(RELEASES["0.1.0"], _read_only(RELEASES["0.1.0"]))
    assert {job["status"] for job in old["jobs"]} == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert len(old["batches"]) == 2 and len(old["metric_points"]) > 10
    assert max(job["base_params"] or 0 for job in old["jobs"]) > 2**32
    last = _typed_rows(RELEASES["0.2.0"], _read_only(RELEASES["0.2.0"]))
    assert {job["status"] for job in last["jobs"]} == {"waiting", "queued", "running", "succeeded", "failed",
                                                      "skipped"}
    assert last["job_needs"] and any(job["params"] for job in last["jobs"])
    assert any(job["history"] for job in last["jobs"]) and any(job["samples"] for job in last["jobs"])
    assert any(job["head_params"] for job in last["jobs"]) and any(job["metrics"] for job in last["jobs"])


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_graftq_db_upgrade_keeps_every_row_of_a_previous_release_on_sqlite(release, tmp_path, graftq_env):
    fixture = RELEASES[release]
    expected = _typed_rows(fixture, _read_only(fixture))
    path = tmp_path / "graftq.db"
    shutil.copyfile(fixture, path)
    url = f"sqlite:///{path}"
    _check_upgraded(fixture, dict(graftq_env, GRAFTQ_DATABASE_URL=url), url, expected)


@pytest.mark.postgres
@pytest.mark.parametrize("release", sorted(RELEASES))
def test_graftq_db_upgrade_keeps_every_row_of_a_previous_release_on_postgresql(release, postgres_database,
                                                                               graftq_env):
    from alembic import command

    fixture = RELEASES[release]
    expected = _typed_rows(fixture, _read_only(fixture))
    url = postgres_database
    engine = create_engine(url)
    with engine.begin() as connection:  # the release's schema, then its rows
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, _release_revision(fixture))
        for table in metadata.sorted_tables:
            if table.name in expected:  # tables added since the release start empty
                connection.execute(_release_table(fixture, table.name).insert(), expected[table.name])
        connection.execute(text("SELECT setval(pg_get_serial_sequence('metric_points', 'id'), "
                                "(SELECT max(id) FROM metric_points))"))
    engine.dispose()
    _check_upgraded(fixture, dict(graftq_env, GRAFTQ_DATABASE_URL=url), url, expected)
