"""Results query: `graftq results --sort eval_loss --limit 20` on 100,000 jobs, subprocess wall time.

The rows are bulk-inserted straight into db.tables in a fresh SQLite file (Alembic head schema,
indexes included); about 80% have an eval_loss, the rest are failed or queued. The command
runs the way a user types it; the figure is the median of several runs (table output, and JSON
as a second figure).
"""

from __future__ import annotations

import time

from _common import (
    Check,
    Result,
    graftq_argv,
    graftq_env,
    main,
    median,
    populate,
    sqlite_url,
    time_command,
    workspace,
)

NAME = "results_query"
TARGET_SECONDS = 0.5


def run(quick: bool) -> Result:
    jobs = 20_000 if quick else 100_000
    repeats = 3 if quick else 7
    result = Result(NAME, f"`graftq results --sort eval_loss --limit 20` on {jobs:,} jobs (SQLite), median of "
                          f"{repeats}")
    with workspace("results") as tmp:
        database_url = sqlite_url(tmp)
        started = time.perf_counter()
        populate(database_url, jobs)
        result.figures["insert_s"] = time.perf_counter() - started
        env = graftq_env(GRAFTQ_DATABASE_URL=database_url, GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"))
        table = graftq_argv("results", "--sort", "eval_loss", "--limit", "20")
        as_json = [*table, "--format", "json"]
        _, first = time_command(table, env=env)  # warm-up (page cache)
        lines = first.stdout.count("\n")
        table_times, json_times = [], []
        for _ in range(repeats):
            table_times.append(time_command(table, env=env)[0])
            json_times.append(time_command(as_json, env=env)[0])
        import json

        rows = json.loads(time_command(as_json, env=env)[1].stdout)
    losses = [row["eval_loss"] for row in rows]
    result.figures.update({"jobs": jobs, "table_s": table_times, "json_s": json_times, "table_lines": lines,
                           "rows_returned": len(rows)})
    ok_rows = len(rows) == 20 and losses == sorted(losses) and None not in losses
    result.checks.append(Check("results --sort eval_loss --limit 20 (table) wall time, median",
                               value=median(table_times), unit="s", target=f"< {TARGET_SECONDS} s",
                               passed=median(table_times) < TARGET_SECONDS and ok_rows))
    result.checks.append(Check("same with --format json, median", value=median(json_times), unit="s",
                               target=f"< {TARGET_SECONDS} s",
                               passed=median(json_times) < TARGET_SECONDS and ok_rows))
    if not ok_rows:
        result.notes.append(f"unexpected rows: {len(rows)} rows, eval_loss {losses[:5]}...")
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
