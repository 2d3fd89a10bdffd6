"""Scripts vs queue: 20 small LoRA experiments as 20 Python scripts, and as one `graftq run`.

Without a queue, an experiment is a script: it imports torch, transformers and peft, builds the
model, trains with a plain loop, evaluates, saves its adapter and exits; a sweep of 20 is 20 runs
of it. `SCRIPT` below is that script, written as one would write it by hand (it imports nothing
of graftq): the same T5 architecture as `random:t5-tiny` (its config is passed in), the same
byte-level tokens, held-out split, LoRA settings, AdamW, gradient clipping at 1.0, held-out
loss before and after training, `save_pretrained` of the adapter and a metrics file.

The queue side is one `graftq run` of the same 20 jobs (LoRA `train` jobs of 30 steps on
random:t5-tiny; same data, batch size, learning rates and ranks), with its own SQLite file and
artifacts directory: the command's wall time, start to exit, including recording every job and
writing its job.json. Both sides turn the generated-text metrics off (`metrics: []`,
`num_samples: 0`), so that they do the same work, and both train on one thread.

The scripts run one after another, as a sweep on one machine does (on a 2-core machine, running
them side by side only shares the same cores). The first half runs before the `graftq run`,
the second half after it, so that a drift of the shared machine's speed hits both sides alike.
Each script reports how long its imports took (module loading before any work), which is most of
the difference.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from _common import (
    EXAMPLES,
    Check,
    Result,
    graftq_argv,
    graftq_env,
    main,
    sqlite_url,
    time_command,
    workspace,
    write_batch,
)

NAME = "scripts_vs_queue"
TARGET_SPEEDUP = 5.0
PRESET = "t5-tiny"
STEPS = 30
TRAIN = {"dataset": str(EXAMPLES / "reverse.jsonl"), "max_steps": STEPS, "batch_size": 16, "max_length": 32,
         "eval_fraction": 0.1, "seed": 0, "metrics": [], "num_samples": 0}
#: The sweep: every rank with every learning rate.
RANKS = [4, 8, 16, 32]
LEARNING_RATES = [1e-3, 2e-3, 3e-3, 5e-3, 1e-2]

#: Both sides train on one thread: on a shared 2-core machine, OpenMP teams of two wait on each
#: other under other people's load and make a job's time swing.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

SCRIPT = '''\
"""Train one LoRA adapter on a small T5 and save it (one experiment of a sweep)."""
import argparse
import json
import time

started = time.perf_counter()
import torch
from peft import LoraConfig, get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

imported = time.perf_counter()
parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True, help="the T5 config as JSON")
parser.add_argument("--data", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--r", type=int, default=8)
parser.add_argument("--alpha", type=int, default=16)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--max-length", type=int, default=32)
parser.add_argument("--eval-fraction", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--model-seed", type=int, default=1234)
args = parser.parse_args()
PAD, EOS, OFFSET = 0, 1, 3  # byte-level ids: byte b is id b + 3


def encode(text):
    return [b + OFFSET for b in text.encode("utf-8")][: args.max_length - 1] + [EOS]


def collate(rows):
    width = max(len(source) for source, _ in rows)
    label_width = max(len(target) for _, target in rows)
    return {
        "input_ids": torch.tensor([s + [PAD] * (width - len(s)) for s, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in rows]),
        "labels": torch.tensor([t + [-100] * (label_width - len(t)) for _, t in rows]),
    }


@torch.no_grad()
def evaluate(model, rows):
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), args.batch_size):
        batch = collate(rows[start:start + args.batch_size])
        tokens = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    model.train()
    return total / count


with open(args.data) as lines:
    rows = [json.loads(line) for line in lines if line.strip()]
examples = [(encode(row["input"]), encode(row["target"])) for row in rows]
order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
n_eval = max(1, round(len(examples) * args.eval_fraction))
eval_rows = [examples[i] for i in order[:n_eval]]
train_rows = [examples[i] for i in order[n_eval:]]

torch.manual_seed(args.model_seed)
model = T5ForConditionalGeneration(T5Config(**json.loads(args.config)))
torch.manual_seed(args.seed)
model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.05,
                                         target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
eval_before = evaluate(model, eval_rows)
shuffle = torch.Generator().manual_seed(args.seed)
order, position = torch.randperm(len(train_rows), generator=shuffle).tolist(), 0
for step in range(args.steps):
    if position + args.batch_size > len(order):
        order, position = torch.randperm(len(train_rows), generator=shuffle).tolist(), 0
    batch = collate([train_rows[i] for i in order[position:position + args.batch_size]])
    position += args.batch_size
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
eval_after = evaluate(model, eval_rows)
model.save_pretrained(args.out)
metrics = {"train_loss": loss.item(), "eval_loss_before": eval_before, "eval_loss": eval_after,
           "steps": args.steps, "r": args.r, "lr": args.lr}
with open(f"{args.out}/metrics.json", "w") as out:
    json.dump(metrics, out)
print(json.dumps({"import_seconds": imported - started, "seconds": time.perf_counter() - started, **metrics}))
'''


def sweep(count: int) -> list[dict]:
    """The experiments: (rank, learning rate) pairs, the first `count` of every rank x every rate."""
    pairs = [(r, lr) for lr in LEARNING_RATES for r in RANKS][:count]
    return [{"r": r, "lr": lr} for r, lr in pairs]


def graftq_jobs(experiments: list[dict]) -> list[dict]:
    return [{"task": f"reverse-r{e['r']}-lr{e['lr']:g}", "extension": "lora", "device": "cpu",
             "lora": {"r": e["r"], "alpha": 2 * e["r"], "dropout": 0.05, "target_modules": ["q", "v"]},
             "train": {**TRAIN, "learning_rate": e["lr"]}} for e in experiments]


def run_script(script: Path, experiment: dict, out: Path, env: dict[str, str]) -> dict:
    """One experiment as its own `python train_lora.py ...`; its report plus the wall time of the process."""
    from jobs.presets import PRESETS

    preset = PRESETS[PRESET]
    config = {key: value for key, value in preset["config"].items() if key != "model_type"}
    argv = [sys.executable, str(script), "--config", json.dumps(config), "--data", TRAIN["dataset"],
            "--out", str(out), "--r", str(experiment["r"]), "--alpha", str(2 * experiment["r"]),
            "--lr", str(experiment["lr"]), "--steps", str(STEPS), "--batch-size", str(TRAIN["batch_size"]),
            "--max-length", str(TRAIN["max_length"]), "--eval-fraction", str(TRAIN["eval_fraction"]),
            "--seed", str(TRAIN["seed"]), "--model-seed", str(preset["seed"])]
    seconds, completed = time_command(argv, env=env)
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    if not (out / "adapter_model.safetensors").exists():
        raise RuntimeError(f"the script for {experiment} saved no adapter in {out}")
    return {**report, "wall_seconds": seconds}


def graftq_run(tmp: Path, experiments: list[dict]) -> dict:
    """One `graftq run` of the experiments: its wall time and the jobs' own times from the database."""
    from sqlalchemy import select

    from db.queries import jobs_of_batch
    from db.session import get_database
    from db.tables import jobs as jobs_table

    database_url = sqlite_url(tmp)
    env = graftq_env(GRAFTQ_DATABASE_URL=database_url, GRAFTQ_ARTIFACTS_DIR=str(tmp / "artifacts"), **ONE_THREAD)
    batch = write_batch(tmp / "sweep.yaml", "sweep", graftq_jobs(experiments), f"random:{PRESET}")
    started = time.time()
    seconds, _ = time_command(graftq_argv("run", str(batch)), env=env, cwd=tmp)
    with get_database(database_url).read() as session:
        [batch_id] = set(session.scalars(select(jobs_table.c.batch_id)))
        jobs = jobs_of_batch(session, batch_id)
    failed = [job.task for job in jobs if job.status != "succeeded"]
    if failed or len(jobs) != len(experiments):
        raise RuntimeError(f"graftq run: {len(jobs)} jobs, not succeeded: {failed}")
    jobs = sorted(jobs, key=lambda job: job.started_at)
    return {"seconds": seconds, "job_seconds": [(job.finished_at - job.started_at).total_seconds() for job in jobs],
            "until_first_claim_s": jobs[0].started_at.timestamp() - started,
            "eval_loss": [job.eval_loss for job in jobs]}


def run(quick: bool) -> Result:
    count = 2 if quick else 20
    experiments = sweep(count)
    result = Result(NAME, f"{count} LoRA train jobs ({STEPS} steps, random:{PRESET}) as {count} Python scripts "
                          "vs one `graftq run`")
    with workspace("scripts") as tmp:
        script = tmp / "train_lora.py"
        script.write_text(SCRIPT)
        env = graftq_env(**ONE_THREAD)
        half = count // 2
        scripts = [run_script(script, e, tmp / "scripts" / f"exp{i:02d}", env)
                   for i, e in enumerate(experiments[:half])]
        queue = graftq_run(tmp, experiments)
        scripts += [run_script(script, e, tmp / "scripts" / f"exp{i:02d}", env)
                    for i, e in enumerate(experiments[half:], start=half)]

    scripts_total = sum(s["wall_seconds"] for s in scripts)
    ratio = queue["seconds"] / scripts_total
    imports = [s["import_seconds"] for s in scripts]
    result.figures.update({
        "jobs": count,
        "scripts_total_s": scripts_total,
        "script_wall_s_median": statistics.median(s["wall_seconds"] for s in scripts),
        "script_import_s_median (torch+transformers+peft)": statistics.median(imports),
        "script_share_of_time_in_imports": sum(imports) / scripts_total,
        "script_work_s_median (after the imports)": statistics.median(s["seconds"] - s["import_seconds"]
                                                                       for s in scripts),
        "graftq_run_s": queue["seconds"],
        "graftq_until_first_claim_s (start, validation, records)": queue["until_first_claim_s"],
        "graftq_first_job_s (the imports of torch, transformers, peft, once)": queue["job_seconds"][0],
        "graftq_later_job_s_median (claim to outcome)": statistics.median(queue["job_seconds"][1:]),
        "eval_loss_median (scripts, graftq)": [statistics.median(s["eval_loss"] for s in scripts),
                                               statistics.median(queue["eval_loss"])],
    })
    result.checks.append(Check(
        f"{count} experiments: one `graftq run` vs {count} scripts one after another "
        f"(graftq {1 / ratio:.1f}x faster)",
        value=queue["seconds"], reference=scripts_total, ratio=ratio, unit="s",
        target=f"ratio <= {1 / TARGET_SPEEDUP:g} (graftq >= {TARGET_SPEEDUP:g}x faster)",
        passed=ratio <= 1 / TARGET_SPEEDUP))
    result.notes.append("the first half of the scripts ran before the `graftq run`, the second half after it")
    return result


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
