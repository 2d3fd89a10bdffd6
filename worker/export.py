"""Export a finished job: its artifacts with loading notes, or one merged Hugging Face model.

    export_artifacts(job_dir, out_dir)   # adapter/ and layer/ as saved, plus README.md
    export_merged(job_dir, out_dir)      # LoRA merged, added blocks part of the model

The merged directory is a plain transformers model (safetensors, config, tokenizer): loading it
and calling `generate()` needs neither graftq nor peft.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.artifacts import read_job_json
from worker.errors import ConfigError, JobError
from worker.storage import local_copy

#: transformers Auto class that loads a merged model, by the model class's name suffix
AUTO_CLASSES = {
    "ForConditionalGeneration": "AutoModelForSeq2SeqLM",
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
}


def auto_class_name(model) -> str:
    """The transformers Auto class that loads `model`'s saved directory (AutoModel when unknown)."""
    name = type(model).__name__
    return next((auto for suffix, auto in AUTO_CLASSES.items() if name.endswith(suffix)), "AutoModel")


def _fresh_directory(out_dir: Path, write: Callable[[Path], Any]) -> Any:
    """Call `write(staging)` and rename the staging directory to `out_dir`, which must not exist yet
    (or be empty): a failed export leaves nothing behind."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise JobError(f"OUT_DIR: {out_dir} already exists and is not empty; name a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        written = write(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


# -- artifacts as saved -----------------------------------------------------------------------------


def export_artifacts(job_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the job's `adapter/` and `layer/` (and job.json) into `out_dir` with a README.md on
    loading them; return the names written. Raises JobError for a job directory without them."""
    job_dir = local_copy(job_dir)
    info = read_job_json(job_dir)
    parts = [name for name in ("adapter", "layer") if (job_dir / name).is_dir()]
    if not parts:
        raise JobError(f"{job_dir} holds neither adapter/ nor layer/; nothing to export")

    def write(directory: Path) -> list[str]:
        for name in parts:
            shutil.copytree(job_dir / name, directory / name)
        shutil.copy2(job_dir / "job.json", directory / "job.json")
        (directory / "README.md").write_text(artifacts_readme(info, parts))
        return [*parts, "job.json", "README.md"]

    return _fresh_directory(Path(out_dir), write)


def artifacts_readme(info: dict, parts: list[str]) -> str:
    """How to load what `export_artifacts` wrote, for this job."""
    spec = info.get("spec", {})
    base = spec.get("base_model", "?")
    lines = [f"# graftq job {info.get('job_id')} ({spec.get('extension')}, task {spec.get('task')})", "",
             f"Base model: `{base}`.", ""]
    if base.startswith("random:"):
        lines += [f"`{base}` is one of graftq's random presets: rebuild it with "
                  f"`worker.models.build_random_preset(\"{base.removeprefix('random:')}\")` (graftq's byte-level "
                  "tokenizer comes with it).", ""]
    if "layer" in parts:
        lines += ["`layer/` holds an added transformer block (`layer.safetensors`) and where it goes "
                  "(`extension.json`). Plain transformers does not know it; load the whole model with graftq:", "",
                  "```python", "from worker.pipeline import load_job_model", "",
                  "model, tokenizer, info = load_job_model(\"THIS_DIRECTORY\")", "```", "",
                  "or write a standalone Hugging Face model with `graftq export JOB_ID OUT_DIR --merge`.", ""]
    if parts == ["adapter"]:
        lines += ["`adapter/` is a PEFT adapter:", "", "```python",
                  "from peft import PeftModel", "from transformers import AutoModelForSeq2SeqLM  # or AutoModelForCausalLM",
                  "", f"base = AutoModelForSeq2SeqLM.from_pretrained(\"{base}\")",
                  "model = PeftModel.from_pretrained(base, \"THIS_DIRECTORY/adapter\")",
                  "model = model.merge_and_unload()  # optional: the adapter folded into the weights", "```", ""]
    elif "adapter" in parts:
        lines += ["`adapter/` is a PEFT adapter for the base model *with the added block*: `load_job_model` "
                  "applies both.", ""]
    return "\n".join(lines)


# -- merged ---------------------------------------------------------------------------------------


def export_merged(job_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> dict[str, Any]:
    """Write the job's model as one Hugging Face model directory: LoRA merged into the weights, added
    blocks part of the model and its config; the tokenizer next to it. Returns
    {"auto_class": ..., "model_class": ..., "layer_counts": {...}}. Raises JobError."""
    from worker.predict import load_model

    model, tokenizer, info = load_model(job_dir, "cpu", dtype)
    if hasattr(model, "merge_and_unload"):  # a PeftModel: fold each adapter into its base weights
        model = model.merge_and_unload()
    counts = sync_layer_counts(model)
    model.config.name_or_path = ""

    def write(directory: Path) -> dict[str, Any]:
        model.save_pretrained(directory, safe_serialization=True)
        save_tokenizer(tokenizer, directory)
        summary = {"auto_class": auto_class_name(model), "model_class": type(model).__name__,
                   "layer_counts": counts, "job_id": info.get("job_id"),
                   "base_model": info.get("spec", {}).get("base_model")}
        (directory / "README.md").write_text(merged_readme(summary))
        return summary

    return _fresh_directory(Path(out_dir), write)


def sync_layer_counts(model) -> dict[str, int]:
    """Make the config's layer counts say how many blocks each stack has; return {config key: count}.

    An encoder-decoder family whose config keeps the decoder depth under a key that
    `get_text_config(decoder=True)` does not read (T5's `num_decoder_layers`) also gets
    `decoder_layers`: transformers sizes the generation cache from it, and a decoder deeper than
    that cache fails in generate() with an IndexError. Raises JobError when a count cannot be made
    to agree.
    """
    from worker.architectures import architecture_for
    from worker.extensions.layer import find_stack

    arch = architecture_for(model)
    config = model.config
    counts: dict[str, int] = {}
    for stack, key in arch.layer_count_keys.items():
        try:
            _, _, blocks = find_stack(model, arch, stack)
        except ConfigError:  # a variant without this stack
            continue
        setattr(config, key, len(blocks))
        counts[key] = len(blocks)
        layer_types = getattr(config, "layer_types", None)
        if stack == arch.default_stack and isinstance(layer_types, list) and len(layer_types) != len(blocks):
            raise JobError(f"export: config.layer_types has {len(layer_types)} entries for {len(blocks)} "
                           f"{stack} blocks")
    if config.is_encoder_decoder and "decoder" in arch.stacks:
        _, _, decoder = find_stack(model, arch, "decoder")
        if config.get_text_config(decoder=True).num_hidden_layers != len(decoder):
            config.decoder_layers = len(decoder)
            counts["decoder_layers"] = len(decoder)
        if config.get_text_config(decoder=True).num_hidden_layers != len(decoder):
            raise JobError(f"export: cannot make this {arch.family} config say its decoder has {len(decoder)} blocks")
    return counts


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save a tokenizer that plain transformers loads: a Hugging Face one as it is; graftq's byte-level
    tokenizer (random presets) as an equivalent `tokenizer.json` (same ids: 0 pad, 1 eos, 2 unk, byte
    b = b + 3; eos appended), plus graftq's marker so that graftq itself keeps using its own."""
    from worker.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        byte_tokenizer_for_transformers().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def byte_tokenizer_for_transformers():
    """graftq's ByteTokenizer as a transformers fast tokenizer: a byte-level BPE without merges, so
    that every UTF-8 byte is one token, with eos appended as graftq encodes inputs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from worker.tokenizer import ByteTokenizer

    vocab = {"<pad>": ByteTokenizer.pad_token_id, "</s>": ByteTokenizer.eos_token_id, "<unk>": ByteTokenizer.unk_token_id}
    vocab.update({char: byte + ByteTokenizer.offset for byte, char in _bytes_to_unicode().items()})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable character for each byte value (the GPT-2 convention that the
    `tokenizers` ByteLevel pre-tokenizer and decoder use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(others)}}


def merged_readme(summary: dict[str, Any]) -> str:
    auto = summary["auto_class"]
    counts = ", ".join(f"`{key}` = {value}" for key, value in summary["layer_counts"].items())
    return "\n".join([
        f"# graftq job {summary['job_id']}, merged", "",
        f"A standalone `{summary['model_class']}` made from `{summary['base_model']}`: its LoRA adapter (if any) is "
        f"merged into the weights and its added blocks are part of the model ({counts}).", "",
        "```python", f"from transformers import AutoTokenizer, {auto}", "",
        f"model = {auto}.from_pretrained(\"THIS_DIRECTORY\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIRECTORY\")", "```", "",
        "graftq encodes an input as its tokens followed by the eos token (`tokenizer.eos_token_id`); give the model "
        "inputs encoded the same way.", "",
    ])
