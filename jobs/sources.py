"""Dataset sources of `train.dataset`, torch-free: what a reference names, where the Hugging Face
cache keeps an `hf:` dataset, and which columns a source has.

The column readers are cheap (a CSV header, a first JSONL record, a Parquet schema, the JSON
metadata `save_to_disk` and `load_dataset` write): `graftq submit` checks every source with them
without importing `datasets`. The worker (worker/data.py) reads the rows.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

HF_PREFIX = "hf:"
#: suffix -> reader
FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
                ".parquet": "parquet"}
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_CONFIG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class HubRef:
    """`hf:NAME[:CONFIG]`."""

    name: str
    config: str | None

    def __str__(self) -> str:
        return HF_PREFIX + self.name + (f":{self.config}" if self.config else "")


def parse_hub(reference: str) -> HubRef:
    """The HubRef of `hf:NAME[:CONFIG]`; ValueError saying what is wrong with the reference."""
    name, _, config = reference.removeprefix(HF_PREFIX).partition(":")
    if not _HUB_NAME.fullmatch(name) or (config and not _CONFIG.fullmatch(config)) or (_ and not config):
        raise ValueError(f"{reference!r} is not a hub dataset reference: write hf:NAME or hf:NAME:CONFIG "
                         "(e.g. hf:nyu-mll/glue:sst2)")
    return HubRef(name, config or None)


def _hf_home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.environ.get("HF_HOME") or default).expanduser()


def datasets_cache() -> Path:
    """Where `datasets.load_dataset` keeps prepared datasets (read from the environment at each call)."""
    return Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()


def hub_cache() -> Path:
    """Where the hub client keeps downloaded repositories (`hf download --repo-type dataset`)."""
    found = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(found or _hf_home() / "hub").expanduser()


def _snake(name: str) -> str:
    # datasets' camelcase_to_snakecase: the cache directory of a prepared dataset uses it.
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def prepared_dirs(ref: HubRef) -> list[Path]:
    """The prepared copies of `ref` (config/version/hash directories) in the datasets cache, newest last."""
    parts = ref.name.split("/")
    root = datasets_cache() / "___".join([*parts[:-1], _snake(parts[-1])])
    found = [path for path in root.glob(f"{ref.config or '*'}/*/*")
             if path.is_dir() and (path / "dataset_info.json").is_file()]
    return sorted(found, key=lambda path: path.stat().st_mtime)


def hub_snapshot(ref: HubRef) -> Path | None:
    """The downloaded snapshot of `ref`'s repository in the hub cache (the `main` one when recorded)."""
    repo = hub_cache() / f"datasets--{ref.name.replace('/', '--')}"
    main = repo / "refs" / "main"
    if main.is_file():
        snapshot = repo / "snapshots" / main.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((path for path in (repo / "snapshots").glob("*") if path.is_dir()),
                       key=lambda path: path.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def not_cached(ref: HubRef) -> str:
    """Why `ref` cannot be loaded offline, and how to put it in the cache."""
    config = f", {ref.config!r}" if ref.config else ""
    return (f"hub dataset {str(ref)!r} is not in the local Hugging Face cache ({datasets_cache()} or "
            f"{hub_cache()}); graftq never downloads. Load it once where there is network access, with the "
            f"worker's HF_HOME: `python -c \"import datasets; datasets.load_dataset({ref.name!r}{config})\"` "
            f"(or `hf download --repo-type dataset {ref.name}`), or save it with `save_to_disk` and give "
            "that directory")


def _saved_dataset_info(directory: Path, split: str) -> tuple[list[str] | None, str | None]:
    """(columns, problem) of a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split not in splits:
            return None, (f"has no split {split!r} (it has {', '.join(map(str, splits)) or 'none'}); set "
                          "train.split")
        directory = directory / split
    info = directory / "dataset_info.json"
    if not info.is_file() or not (directory / "state.json").is_file():
        return None, ("is not a dataset directory: give a JSONL, CSV or Parquet file, or a directory written "
                      "by `datasets`' save_to_disk")
    features = json.loads(info.read_text(encoding="utf-8")).get("features") or {}
    return list(features), None


def columns_of(path: Path, split: str) -> tuple[list[str] | None, str | None]:
    """(the column names, None) of a local source, or (None, why it cannot serve). Cheap: reads a
    header, a first record, a Parquet schema or a directory's JSON metadata. `columns` is None
    without a problem when they cannot be read here (Parquet without pyarrow installed)."""
    shown = repr(str(path))
    if not path.exists():
        return None, f"dataset {shown} does not exist (relative paths are resolved against the batch file)"
    try:
        if path.is_dir():
            columns, problem = _saved_dataset_info(path, split)
            return columns, (f"dataset directory {shown} {problem}" if problem else None)
        kind = FILE_FORMATS.get(path.suffix.lower())
        if kind is None:
            return None, (f"dataset {shown} has an unknown extension: use .jsonl, .csv, .tsv or .parquet, a "
                          "save_to_disk directory or hf:NAME")
        if kind == "parquet":
            try:
                import pyarrow.parquet
            except ImportError:  # a submit-only install: the worker checks the columns
                return None, None
            return list(pyarrow.parquet.read_schema(path).names), None
        with path.open(encoding="utf-8", newline="") as handle:
            if kind in ("csv", "tsv"):
                header = next(csv.reader(handle, delimiter="\t" if kind == "tsv" else ","), None)
                return [c.strip() for c in header] if header else [], None
            first = next((line for line in handle if line.strip()), None)
            if first is None:
                return None, f"dataset {shown} is empty"
            record = json.loads(first)
            if not isinstance(record, dict):
                return None, f"dataset {shown}: each line must be a JSON object (a record)"
            return list(record), None
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
        return None, f"dataset {shown} cannot be read: {error}"


def hub_columns(ref: HubRef, split: str) -> tuple[list[str] | None, str | None]:
    """(columns, None) of a cached hub dataset, (None, None) when only its raw files are cached (the
    worker checks those), or (None, why) when it is not cached or lacks the split."""
    prepared = prepared_dirs(ref)
    if not prepared:
        return (None, None) if hub_snapshot(ref) is not None else (None, not_cached(ref))
    try:
        info = json.loads((prepared[-1] / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    splits = list(info.get("splits") or {})
    if splits and split not in splits:
        return None, f"hub dataset {str(ref)!r} has no split {split!r} (it has {', '.join(splits)}); set train.split"
    return list(info.get("features") or {}), None


def missing_columns(columns: list[str], needed: dict[str, str]) -> str | None:
    """Why a source with `columns` lacks some of `needed` (graftq column -> the source's column), or None."""
    missing = [(ours, theirs) for ours, theirs in needed.items() if theirs not in columns]
    if not missing:
        return None
    named = ", ".join(f"`{theirs}`" + (f" (for {ours})" if ours != theirs else "") for ours, theirs in missing)
    found = ", ".join(map(str, columns[:10])) or "none"
    return f"has no column {named} (found: {found}); map the columns with train.columns, e.g. {{input: text}}"
