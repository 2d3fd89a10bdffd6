"""Write the toy seq2seq datasets under examples/data/ (fixed seed, so the files never change).

    python scripts/make_example_data.py [--out examples/data] [--rows 400]
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for task, transform in TASKS.items():
        rng = random.Random(f"{args.seed}-{task}")
        path = args.out / f"{task}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for _ in range(args.rows):
                text = sample_input(task, rng)
                handle.write(json.dumps({"input": text, "target": transform(text)}) + "\n")
        print(f"wrote {args.rows} rows to {path}")


if __name__ == "__main__":
    main()
