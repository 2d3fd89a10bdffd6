"""Run graftq's benchmarks (GitHub issue 6): `python benchmarks/run_all.py [--quick] [--only NAME] [--json PATH]`.

Each benchmark runs in its own Python process (its imports and memory colour no other figure),
prints its figures, the ratio to a reference measured in the same run on the same machine,
and PASS/FAIL against its target. This script prints a summary, writes every result as JSON
to `--json PATH` when given, and exits 1 when a target is missed or a benchmark broke.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine  # noqa: E402

from worker.launcher import detect_gpus  # noqa: E402 - stdlib only, no torch: what `graftq worker` lists

#: Engine-only benchmarks first, then those that start Redis, a database and workers.
BENCHMARKS = ["training_speed", "model_reuse", "memory_growth", "cli_start", "submission", "dispatch",
              "results_query", "scripts_vs_queue", "pool_load"]
BENCHMARKS.append("packed")  # graftq run --pack 4 vs --pack 1
#: Run by default only where `nvidia-smi -L` lists a GPU.
GPU_BENCHMARKS = ["gpu_training"]
#: Need the PostgreSQL server of GRAFTQ_TEST_POSTGRES_URL; skipped, with the reason, where it cannot be reached.
POSTGRES_BENCHMARKS = ["pool_load"]
TIMEOUT_S = {"quick": 600, "full": 1200}
#: Longer limits of full-size runs: 2,000 jobs through 8 workers take a quarter of an hour on a busy 2-core machine.
FULL_TIMEOUT_S = {"pool_load": 3600}


def run_one(name: str, quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="graftq-bench-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(out)] + (["--quick"] if quick else [])
        started = time.perf_counter()
        try:
            timeout = TIMEOUT_S["quick"] if quick else FULL_TIMEOUT_S.get(name, TIMEOUT_S["full"])
            completed = subprocess.run(argv, timeout=timeout)
            code = completed.returncode
        except subprocess.TimeoutExpired:
            code = None
        if out.exists():
            return json.loads(out.read_text())
        return {"name": name, "passed": False, "checks": [], "seconds": time.perf_counter() - started,
                "error": "timed out" if code is None else f"exited with {code} without a result"}


def postgres_unreachable() -> str | None:
    """Why the PostgreSQL server of GRAFTQ_TEST_POSTGRES_URL cannot be used; None when it can."""
    from sqlalchemy import create_engine, text

    url = os.environ.get("GRAFTQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # any failure to connect means: no server for this run
        return f"PostgreSQL not reachable at {url} (set GRAFTQ_TEST_POSTGRES_URL): {str(error).splitlines()[0]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes: a smoke run (a few minutes)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS + GPU_BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS + GPU_BENCHMARKS)} "
                             f"({', '.join(GPU_BENCHMARKS)}: on a GPU machine, where it also runs by default; "
                             f"{', '.join(POSTGRES_BENCHMARKS)}: needs PostgreSQL, GRAFTQ_TEST_POSTGRES_URL)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the summary as JSON to PATH")
    args = parser.parse_args(argv)
    has_gpu = bool(detect_gpus())
    names = args.only or BENCHMARKS + (GPU_BENCHMARKS if has_gpu else [])
    if not has_gpu and any(name in GPU_BENCHMARKS for name in names):
        print(f"skipping {', '.join(n for n in names if n in GPU_BENCHMARKS)}: `nvidia-smi -L` lists no GPU here")
        names = [name for name in names if name not in GPU_BENCHMARKS]
    no_postgres = any(name in POSTGRES_BENCHMARKS for name in names) and postgres_unreachable()
    if no_postgres:
        print(f"skipping {', '.join(n for n in names if n in POSTGRES_BENCHMARKS)}: {no_postgres}")
        names = [name for name in names if name not in POSTGRES_BENCHMARKS]
    started = time.perf_counter()
    results = []
    for name in names:
        print(f"\n>>> {name}{' (quick)' if args.quick else ''}", flush=True)
        results.append(run_one(name, args.quick))
    total = time.perf_counter() - started
    print("\n==================== summary ====================")
    for result in results:
        print(f"{'PASS' if result['passed'] else 'FAIL'}  {result['name']:<16} ({result['seconds']:.0f} s)")
        for check in result.get("checks", []):
            ratio = f", ratio {check['ratio']:.3f}" if check.get("ratio") is not None else ""
            print(f"      {'ok  ' if check['passed'] else 'MISS'} {check['what']}: {check['value']:.4g} "
                  f"{check['unit']}{ratio} (target {check['target']})")
        if result.get("error"):
            print(f"      ERROR {result['error']}")
    passed = all(result["passed"] for result in results)
    if not results:
        print("no benchmark was run")
    else:
        print(f"{'all targets met' if passed else 'some targets missed'} in {total:.0f} s")
    summary = {"quick": args.quick, "seconds": total, "passed": passed, "machine": machine(),
               "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        print(f"summary written to {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
