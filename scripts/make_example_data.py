"""Write the toy seq2seq datasets under examples/data/ (fixed seed, so the files never change): each
task's training file and a small evaluation file of other draws (`<task>_eval.jsonl`).

    python scripts/make_example_data.py [--out examples/data] [--rows 400] [--eval-rows 40]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

TASKS = {
    "reverse": lambda s: s[::-1],
    "uppercase": lambda s: s.upper(),
    "sort_digits": lambda s: "".join(sorted(s)),
}


def sample_input(task: str, rng: random.Random) -> str:
    length = rng.randint(3, 10)
    alphabet = string.digits if task == "sort_digits" else string.ascii_lowercase
    return "".join(rng.choice(alphabet) for _ in range(length))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "examples" / "data")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        write(args.out / f"{task}.jsonl", task, args.rows, random.Random(f"{args.seed}-{task}"))
        write(args.out / f"{task}_eval.jsonl", task, args.eval_rows, random.Random(f"{args.seed}-{task}-eval"))


def write(path: Path, task: str, rows: int, rng: random.Random) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            text = sample_input(task, rng)
            handle.write(json.dumps({"input": text, "target": TASKS[task](text)}) + "\n")
    print(f"wrote {rows} rows to {path}")


if __name__ == "__main__":
    main()
