"""Package direction: `db` <- `jobs` <- `worker`, and the submitting side stays free of the ML stack.

`jobs/cli.py` reaches `worker` only inside the commands that run jobs or models (`run`, `worker`,
`predict`, `export`), so
`graftq submit`, `results` and `status` start without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "safetensors", "accelerate")
#: The functions of jobs/cli.py that may import `worker`: the commands that start workers, run jobs or
#: load a job's model.
WORKER_COMMANDS = {("run",), ("worker",), ("predict",), ("export",)}


def imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(top-level package, enclosing function/class names) of every absolute import in a module."""
    found: list[tuple[str, tuple[str, ...]]] = []

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = (*scope, child.name)
            elif isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], scope) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], scope))
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), ())
    return found


def modules_of(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def test_db_imports_neither_jobs_nor_worker():
    offenders = {str(path.relative_to(ROOT)): sorted({name for name, _ in imports(path)} & {"jobs", "worker"})
                 for path in modules_of("db")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_jobs_imports_worker_only_inside_the_run_and_worker_commands():
    offenders = [f"{path.relative_to(ROOT)}: {'.'.join(scope) or 'module level'}"
                 for path in modules_of("jobs") for name, scope in imports(path)
                 if name == "worker" and not (path == ROOT / "jobs" / "cli.py" and scope in WORKER_COMMANDS)]
    assert offenders == []


def test_jobs_and_db_never_import_the_ml_stack():
    offenders = {str(path.relative_to(ROOT)): sorted({name for name, _ in imports(path)} & set(HEAVY))
                 for path in modules_of("jobs", "db")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_importing_every_jobs_and_db_module_loads_no_ml_package():
    modules = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for path in modules_of("jobs", "db") if "migrations" not in path.parts)
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
