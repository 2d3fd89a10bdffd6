"""Pre-train the quickstart's base model: a tiny T5 that copies its input (input -> the same text).

    python scripts/pretrain_demo_base.py [--out graftq-data/demo-base] [--steps N] [--force]

The quickstart adapts this model to reverse, uppercase and sort its input: a base that already
reads and writes text, so what an adapter learns shows in its exact match. Training is on
strings drawn from a seeded generator, on one CPU thread, so the same recipe gives the same
weights, and nothing is downloaded. The result is a Hugging Face model
directory (safetensors, config, tokenizer) that `base_model:` names. When the directory already
holds a model of the same recipe (its fingerprint in `pretrain.json`) nothing is done.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import shutil
import string
import sys
import time
import uuid
from pathlib import Path
from typing import Any

#: the saved model's record of how it was made; its fingerprint decides whether to train again
RECORD_FILE = "pretrain.json"
DEFAULT_OUT = Path("graftq-data") / "demo-base"

#: Everything the weights depend on. Changing a value changes the fingerprint, and the next run
#: trains again. The vocabulary is graftq's byte tokenizer (3 specials + 256 bytes).
RECIPE: dict[str, Any] = {
    "version": 1,
    "config": {
        "model_type": "t5", "vocab_size": 259, "d_model": 64, "d_kv": 16, "d_ff": 128,
        "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "dropout_rate": 0.0, "feed_forward_proj": "relu", "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    },
    # Each copied string draws from one of these: both letter cases and digits, so that the tasks'
    # outputs are words it writes, and short alphabets, whose repeated characters it must copy by
    # position rather than by what they are.
    "alphabets": [string.ascii_lowercase, string.ascii_uppercase, string.digits,
                  string.ascii_lowercase + string.ascii_uppercase + string.digits],
    "min_chars": 1,
    "max_chars": 12,
    "steps": 1000,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "warmup_steps": 50,
    "max_grad_norm": 1.0,
    "seed": 0,
}
EVAL_ROWS = 200


def fingerprint(recipe: dict[str, Any]) -> str:
    """A short hash of `recipe` (its JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def read_record(directory: Path) -> dict[str, Any] | None:
    """The `pretrain.json` of a saved base model; None when there is none (or it is unreadable)."""
    try:
        return json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_current(directory: Path, recipe: dict[str, Any]) -> bool:
    """Whether `directory` holds a model trained with `recipe`."""
    record = read_record(directory)
    return (record is not None and record.get("fingerprint") == fingerprint(recipe)
            and (directory / "model.safetensors").is_file())


def copy_rows(rng: random.Random, count: int, recipe: dict[str, Any]) -> list[dict[str, str]]:
    """`count` copy examples: a random string as both input and target."""
    rows = []
    for _ in range(count):
        alphabet = rng.choice(recipe["alphabets"])
        length = rng.randint(recipe["min_chars"], recipe["max_chars"])
        text = "".join(rng.choice(alphabet) for _ in range(length))
        rows.append({"input": text, "target": text})
    return rows


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block: the sums inside a matmul then add up in one order,
    whatever the machine's core count (and tiny matmuls gain nothing from more threads)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrain(recipe: dict[str, Any], log=print):
    """Train a model from `recipe` on the copy task; returns (model, tokenizer), the model in eval mode."""
    import torch
    import transformers

    from worker.data import collate, tokenize
    from worker.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    config = transformers.AutoConfig.for_model(**recipe["config"])
    steps, warmup = recipe["steps"], recipe["warmup_steps"]
    rng = random.Random(f"{recipe['seed']}-train")
    with one_thread():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe["seed"])
            model = transformers.AutoModelForSeq2SeqLM.from_config(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"])
        # linear warm-up, then cosine decay to 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1))
                                                      * 0.5 * (1 + math.cos(math.pi * step / steps)))
        model.train()
        every = max(steps // 5, 1)
        for step in range(1, steps + 1):
            batch = collate(tokenize(copy_rows(rng, recipe["batch_size"], recipe), tokenizer, "seq2seq", 32),
                            "seq2seq", tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % every == 0 or step == steps:
                log(f"  step {step}/{steps}: loss {loss.item():.4f}")
    model.eval()
    return model, tokenizer


def copy_exact_match(model, tokenizer, recipe: dict[str, Any]) -> float:
    """The share of held-out strings (a generator stream training never drew from) that the model
    copies exactly, decoding greedily."""
    import torch

    from worker.data import collate, tokenize

    rows = copy_rows(random.Random(f"{recipe['seed']}-eval"), EVAL_ROWS, recipe)
    batch = collate(tokenize(rows, tokenizer, "seq2seq", 32), "seq2seq", tokenizer.pad_token_id)
    with torch.no_grad(), one_thread():
        output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                max_new_tokens=recipe["max_chars"] + 4, do_sample=False)
    return sum(tokenizer.decode(ids) == row["target"] for ids, row in zip(output, rows, strict=True)) / len(rows)


def save(model, tokenizer, directory: Path, record: dict[str, Any]) -> None:
    """Write the model directory under a temporary name and rename it into place: a reader never
    sees a half-written model, and an interrupted run leaves the previous one."""
    from transformers.utils import logging as transformers_logging

    from worker.export import save_tokenizer

    transformers_logging.disable_progress_bar()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = None
    try:
        model.save_pretrained(staging, safe_serialization=True)
        # tokenizer.json for plain transformers, graftq's marker so that graftq reads it byte by byte
        save_tokenizer(tokenizer, staging)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            directory.rename(old)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(directory: Path, recipe: dict[str, Any] = RECIPE, force: bool = False, log=print) -> dict[str, Any]:
    """Make sure `directory` holds the base model of `recipe`: train and save it unless it is there
    already (or `force`). Returns its record (`pretrain.json`)."""
    if not force and is_current(directory, recipe):
        log(f"{directory}: the copy-task base model is up to date (fingerprint {fingerprint(recipe)})")
        return read_record(directory)
    import torch
    import transformers

    log(f"pre-training the demo base model on the copy task ({recipe['steps']} steps) into {directory}")
    started = time.perf_counter()
    model, tokenizer = pretrain(recipe, log)
    seconds = time.perf_counter() - started
    record = {
        "fingerprint": fingerprint(recipe), "recipe": recipe, "train_seconds": round(seconds, 1),
        "copy_exact_match": copy_exact_match(model, tokenizer, recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    save(model, tokenizer, directory, record)
    log(f"{directory}: {record['parameters']:,} parameters, copies {record['copy_exact_match']:.0%} of held-out "
        f"strings exactly; trained in {seconds:.0f}s")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"the model directory to write [default: {DEFAULT_OUT}, as examples/quickstart.yaml "
                             "expects when graftq runs from this directory]")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"],
                        help=f"training steps [default: {RECIPE['steps']}]; fewer make a weaker model")
    parser.add_argument("--force", action="store_true", help="train again even when the model is up to date")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    build(args.out, dict(RECIPE, steps=args.steps), force=args.force)
    return 0


if __name__ == "__main__":
    # from a clone, with or without graftq installed: the checkout's `worker` package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
