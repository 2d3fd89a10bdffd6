"""CLI start: wall time of `graftq --help` and `graftq results` on 1,000 jobs, and what they import.

Each command runs as a subprocess, the way a user types it (the venv's `graftq` script), several
times; the figure is the median. The reference is `python -c "import click"` on the same
interpreter: the floor for any click program. A probe run of each command (and of `status`,
`show`, `submit --dry-run`) lists which heavy modules it imported: torch, transformers and peft
never; Celery only for commands that talk to the broker.
"""

from __future__ import annotations

import sys

from _common import (
    EXAMPLES,
    Check,
    Result,
    graftq_argv,
    graftq_env,
    imported_modules,
    main,
    median,
    populate,
    sqlite_url,
    time_command,
    workspace,
)

NAME = "cli_start"
TARGET_SECONDS = 0.5
ML = {"torch", "transformers", "peft"}


def run(quick: bool) -> Result:
    repeats = 3 if quick else 7
    result = Result(NAME, "`graftq --help` and `graftq results` (1,000 jobs) wall time, subprocess, median "
                          f"of {repeats}")
    with workspace("cli") as tmp:
        database_url = sqlite_url(tmp)
        populate(database_url, 1000, batches=2)
        env = graftq_env(GRAFTQ_DATABASE_URL=database_url, GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"),
                         GRAFTQ_BROKER_URL="redis://127.0.0.1:1/0")  # never reached by these commands
        commands = {"--help": ["--help"], "results": ["results"]}
        times: dict[str, list[float]] = {name: [] for name in [*commands, "reference"]}
        for args in commands.values():  # warm the page cache and .pyc files
            time_command(graftq_argv(*args), env=env)
        time_command([sys.executable, "-c", "import click"], env=env)
        for _ in range(repeats):  # interleaved, so that a busy moment hits all of them
            times["reference"].append(time_command([sys.executable, "-c", "import click"], env=env)[0])
            for name, args in commands.items():
                times[name].append(time_command(graftq_argv(*args), env=env)[0])
        (tmp / "batch.yaml").write_text(
            "batch: probe\nbase_model: random:t5-tiny\njobs:\n"
            f"  - {{task: a, extension: lora, train: {{dataset: {EXAMPLES / 'reverse.jsonl'}}}}}\n")
        probes = {
            "--help": ["--help"], "results": ["results"], "results --format json": ["results", "--format", "json"],
            "status": ["status"], "show": ["show", f"{1:016x}"],
            "submit --dry-run": ["submit", "--dry-run", str(tmp / "batch.yaml")],
        }
        modules = {name: imported_modules(args, env) for name, args in probes.items()}
    reference = median(times["reference"])
    for name in commands:
        value = median(times[name])
        result.checks.append(Check(f"graftq {name} wall time (median)", value=value, reference=reference,
                                   ratio=value / reference, unit="s", target=f"< {TARGET_SECONDS} s",
                                   passed=value < TARGET_SECONDS))
    for name, found in modules.items():
        heavy = sorted(set(found) & (ML | {"celery", "kombu"}))
        result.checks.append(Check(f"graftq {name} imports none of torch/transformers/peft/celery",
                                   value=len(heavy), unit=f"heavy modules {heavy}", target="0",
                                   passed=not heavy))
    result.figures.update({f"{name}_s": values for name, values in times.items()})
    result.figures["modules_imported"] = modules
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
