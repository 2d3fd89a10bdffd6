"""The deployment files: docker-compose.yml, Dockerfile, Makefile and .ci/run.

No Docker engine is needed: the compose file is checked as data (with Compose's own
variable interpolation reproduced), its commands are resolved against the real click
CLI and the real Alembic configuration, and `docker compose config` runs only where a
compose tool is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
TEST_PASSWORDS = {"REDIS_PASSWORD": "redis-secret-123", "POSTGRES_PASSWORD": "pg-secret-456",
                  "S3_SECRET_KEY": "s3-secret-789"}

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$`, applied throughout."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate(raw, TEST_PASSWORDS if env is None else env)


def as_argv(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def root_cli() -> click.Group:
    """The click group behind the `graftq` console script (pyproject: jobs.cli:main)."""
    import jobs.cli

    for name in ("main", "cli"):
        candidate = getattr(jobs.cli, name, None)
        if isinstance(candidate, click.Group):
            return candidate
    raise AssertionError("jobs.cli has no click group named `main` or `cli`")


def resolve_graftq_command(argv: list[str]) -> click.Command:
    """Parse `graftq ...` argv as click would, without running the command.

    Raises click.UsageError for an unknown command, an unknown option or a bad value.
    """
    assert argv[0] == "graftq", argv
    command: click.Command = root_cli()
    context = click.Context(command, info_name="graftq")
    args = argv[1:]
    while isinstance(command, click.Group):
        assert args, f"{argv} names a group, not a command"
        name = args.pop(0)
        sub = command.get_command(context, name)
        if sub is None:
            raise click.UsageError(f"no such command {name!r} in {argv}")
        context = click.Context(sub, info_name=name, parent=context)
        command = sub
    # make_context parses and converts every parameter but does not invoke the callback.
    with command.make_context(context.info_name, args, parent=context.parent):
        pass
    return command


# -- docker-compose.yml --------------------------------------------------------------


def test_compose_has_the_six_services():
    services = load_compose()["services"]
    assert {"redis", "postgres", "s3", "migrate", "worker", "flower"} <= set(services)


def test_compose_refuses_to_start_without_passwords():
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        load_compose({"POSTGRES_PASSWORD": "x"})
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        load_compose({"REDIS_PASSWORD": "x"})
    with pytest.raises(MissingVariable, match="S3_SECRET_KEY"):
        load_compose({"REDIS_PASSWORD": "x", "POSTGRES_PASSWORD": "y"})


def test_redis_is_durable_and_password_protected():
    redis = load_compose()["services"]["redis"]
    argv = as_argv(redis["command"])
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--requirepass"] == TEST_PASSWORDS["REDIS_PASSWORD"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"]), "the AOF must live on a volume"


def test_graftq_services_reach_redis_and_postgres_with_their_passwords():
    services = load_compose()["services"]
    for name in ("migrate", "worker"):
        env = env_of(services[name])
        assert env["GRAFTQ_BROKER_URL"] == f"redis://:{TEST_PASSWORDS['REDIS_PASSWORD']}@redis:6379/0"
        database_url = env["GRAFTQ_DATABASE_URL"]
        assert database_url.startswith("postgresql+psycopg://")
        assert f":{TEST_PASSWORDS['POSTGRES_PASSWORD']}@postgres:5432/" in database_url
    postgres_env = env_of(services["postgres"])
    assert postgres_env["POSTGRES_PASSWORD"] == TEST_PASSWORDS["POSTGRES_PASSWORD"]
    assert database_url.endswith(f"@postgres:5432/{postgres_env['POSTGRES_DB']}")
    assert database_url.split("://", 1)[1].startswith(f"{postgres_env['POSTGRES_USER']}:")


def test_postgres_has_a_volume_and_a_healthcheck():
    postgres = load_compose()["services"]["postgres"]
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])
    assert "pg_isready" in " ".join(as_argv(postgres["healthcheck"]["test"]))


def test_worker_command_is_a_real_graftq_command():
    worker = load_compose()["services"]["worker"]
    argv = as_argv(worker["command"])
    assert argv[:2] == ["graftq", "worker"]
    assert "--gpus" in argv
    assert resolve_graftq_command(argv).name == "worker"


def test_worker_reserves_every_gpu_and_starts_one_process_per_gpu():
    # Compose hands every replica of a service the same GPUs: one container per host takes them
    # all, and `graftq worker --gpus all` pins one process to each.
    worker = load_compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert as_argv(worker["command"]) == ["graftq", "worker", "--gpus", "all"]
    assert "container_name" not in worker and "ports" not in worker  # several hosts run the same service


def test_no_doc_tells_users_to_scale_the_worker_on_one_host():
    docs = {path.name: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    assert {name: text for name, text in docs.items() if re.search(r"--scale\s+worker", text)} == {}
    compose_commands = [line.strip() for text in docs.values() for line in text.splitlines()
                        if line.strip().startswith("docker compose up")]
    assert "docker compose up -d --build" in compose_commands
    assert "`graftq worker --gpus all`" in docs["deployment.md"] and "`count: all`" in docs["deployment.md"]


def test_a_worker_on_a_further_host_reaches_the_pool_host():
    env = env_of(load_compose({**TEST_PASSWORDS, "POOL_HOST": "gpu-host.example"})["services"]["worker"])
    assert "@gpu-host.example:6379/0" in env["GRAFTQ_BROKER_URL"]
    assert "@gpu-host.example:5432/graftq" in env["GRAFTQ_DATABASE_URL"]
    assert env["AWS_ENDPOINT_URL"] == "http://gpu-host.example:8333"


def test_worker_waits_for_the_migration_and_redis():
    depends_on = load_compose()["services"]["worker"]["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert "redis" in depends_on


def test_worker_artifacts_go_to_the_s3_service_and_stage_on_a_volume():
    compose = load_compose()
    services = compose["services"]
    worker, s3 = services["worker"], services["s3"]
    env = env_of(worker)
    assert env["GRAFTQ_ARTIFACTS_DIR"].startswith("s3://graftq/")
    assert "-bucket=graftq" in as_argv(s3["command"]) and as_argv(s3["command"])[0] == "mini"
    assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
    s3_env = env_of(s3)
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]) == ("graftq", TEST_PASSWORDS["S3_SECRET_KEY"])
    assert worker["depends_on"]["s3"]["condition"] == "service_healthy" and "healthcheck" in s3
    assert any(volume.endswith(":/data") for volume in s3["volumes"]), "the bucket must live on a volume"
    mounts = dict(volume.split(":")[:2][::-1] for volume in worker["volumes"])
    source = mounts.get(env["GRAFTQ_ARTIFACTS_CACHE"])
    assert source is not None, f"nothing is mounted at GRAFTQ_ARTIFACTS_CACHE={env['GRAFTQ_ARTIFACTS_CACHE']}"
    assert source in (compose.get("volumes") or {}) or source.startswith(("/", "."))


def test_migrate_is_one_shot_after_postgres_is_healthy():
    migrate = load_compose()["services"]["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart", "no") == "no"
    assert as_argv(migrate["command"]) in (["alembic", "upgrade", "head"], ["graftq", "db", "upgrade"])


def test_migrate_command_creates_the_schema(tmp_path):
    """Run the migrate service's command as compose would, on an empty SQLite file."""
    migrate = load_compose()["services"]["migrate"]
    argv = as_argv(migrate["command"])
    database = tmp_path / "graftq.db"
    env = {**os.environ, "GRAFTQ_DATABASE_URL": f"sqlite:///{database}"}
    if argv[0] == "alembic":
        # The image runs it from its WORKDIR, which holds the repository's alembic.ini.
        assert migrate["working_dir"] == dockerfile_workdir()
        assert (ROOT / "alembic.ini").is_file(), (
            "`alembic upgrade head` needs alembic.ini at the repository root"
        )
        run = [sys.executable, "-m", "alembic", *argv[1:]]
    else:
        resolve_graftq_command(argv)
        run = [sys.executable, "-c", "from jobs.cli import main; main()", *argv[1:]]
    result = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "alembic_version" in tables
    assert len(tables) > 1, tables


def test_flower_watches_the_same_broker_on_port_5555():
    services = load_compose()["services"]
    flower = services["flower"]
    broker_url = env_of(services["worker"])["GRAFTQ_BROKER_URL"]
    argv = as_argv(flower.get("command") or [])
    flower_env = env_of(flower)
    assert f"--broker={broker_url}" in argv or flower_env.get("CELERY_BROKER_URL") == broker_url
    assert any(str(port).endswith("5555:5555") for port in flower["ports"])


@pytest.fixture(scope="module")
def compose_tool() -> list[str]:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for tool in candidates:
        # `version` and `config` parse files only; neither needs a running Docker engine.
        probe = subprocess.run([*tool, "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return tool
    pytest.skip("no compose tool (`docker compose` plugin or `docker-compose`) is installed")


def test_docker_compose_config_accepts_the_file(compose_tool, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    env.update(TEST_PASSWORDS)
    result = subprocess.run(
        [*compose_tool, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=tmp_path,  # away from any .env in the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# -- Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_workdir() -> str:
    return [rest for keyword, rest in dockerfile_instructions() if keyword == "WORKDIR"][-1]


def test_dockerfile_installs_the_worker_postgres_and_s3_extras_and_drops_root():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11")
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    extras = re.search(r"pip install '?\.\[([a-z0-9,]+)\]", runs)
    assert extras and {"worker", "postgres", "s3"} <= set(extras.group(1).split(","))
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_docker_context_keeps_what_the_migration_needs():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("alembic.ini", "db", "jobs", "worker", "pyproject.toml"):
        assert needed not in ignored
    assert ".env" in ignored, "the passwords file must stay out of the image"


# -- Makefile and CI -------------------------------------------------------------------


def make_recipe(target: str) -> tuple[list[str], list[str]]:
    """The prerequisites and recipe lines of a Makefile target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(rf"^{re.escape(target)}\s*:(?!=)(.*)$", line)
        if match:
            recipe = []
            for body in lines[index + 1 :]:
                if not body.startswith("\t"):
                    break
                recipe.append(body.strip())
            return match.group(1).split(), recipe
    raise AssertionError(f"the Makefile has no `{target}` target")


def test_make_test_installs_then_runs_ruff_and_pytest():
    prerequisites, recipe = make_recipe("test")
    assert "install" in prerequisites
    assert "redis-server" in prerequisites
    commands = " && ".join(recipe)
    assert re.search(r"\bruff\"? check \.", commands)
    pytest_line = next(line for line in recipe if re.search(r"\bpytest\b", line))
    assert "HF_HUB_OFFLINE=1" in pytest_line or "$(TEST_ENV)" in pytest_line
    assert not re.search(r"pytest\"?\s.*(\s-k\s|\s-m\s|tests/)", pytest_line), (
        "make test runs the whole suite"
    )


def test_make_install_pins_the_cpu_torch_before_the_worker_extra():
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH_SPEC ?= torch==2.13.0" in makefile
    _, recipe = make_recipe("$(STAMP)")
    torch_step = next(i for i, line in enumerate(recipe) if "$(TORCH_SPEC)" in line)
    extras_step = next(i for i, line in enumerate(recipe) if "-e '.[$(EXTRAS)]'" in line)
    assert torch_step < extras_step


def test_ci_runs_the_readme_test_command():
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci_script
    commands = [
        line.strip() for line in ci_script.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    assert "make test" in commands
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not written yet")
    assert "make test" in readme.read_text(), "README.md must show the test command that CI runs"
