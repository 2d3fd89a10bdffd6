"""Artifact directories: written under a temporary name and renamed into place.

`<artifacts-root>/<batch_id>/<job_id>/` holds `adapter/` (PEFT format), `layer/` (safetensors +
extension JSON) as the kind requires, and `job.json`. A reader never sees a half-written
directory: either the final name is absent, or everything under it is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from worker.errors import JobError

JOB_FILE = "job.json"
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
T = TypeVar("T")


def job_directory(artifacts_root: Path, batch_id: str, job_id: str) -> Path:
    """The job's directory, refusing ids that could leave the artifacts root."""
    for label, value in (("batch id", batch_id), ("job id", job_id)):
        if not _ID_RE.fullmatch(value):
            raise JobError(f"{label} {value!r} is not a generated id; refusing to build a path from it")
    root = Path(artifacts_root).resolve()
    path = (root / batch_id / job_id).resolve()
    if root not in path.parents:
        raise JobError(f"artifact path {path} is outside the artifacts directory {root}")
    return path


def _fsync_tree(directory: Path) -> None:
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as handle:
                os.fsync(handle.fileno())


def replace_directory(staging: Path, final: Path) -> None:
    """Move the finished directory `staging` to `final`, replacing an earlier `final` whole: a reader
    sees the old directory or the new one, never a mix."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomically(final: Path, write: Callable[[Path], T]) -> T:
    """Call `write(staging_dir)`, then move the staging directory to `final` in one rename; return what
    `write` returned."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed mid-save leaves its staging directory behind; the job's current claim
    # holder is its only writer now, so earlier leftovers go.
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        written = write(staging)
        _fsync_tree(staging)
        replace_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def write_job_json(directory: Path, payload: dict) -> None:
    (directory / JOB_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_job_json(job_dir: Path) -> dict:
    path = Path(job_dir) / JOB_FILE
    if not path.exists():
        raise JobError(f"{job_dir} is not a complete graftq job directory (no {JOB_FILE})")
    return json.loads(path.read_text())
