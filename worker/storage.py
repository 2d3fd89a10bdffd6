"""Artifacts in S3-compatible object storage (`GRAFTQ_ARTIFACTS_DIR=s3://bucket/prefix`), committed by a
manifest object.

A worker still writes every job into a local directory: the host's artifacts cache
(GRAFTQ_ARTIFACTS_CACHE, default ./graftq-data/artifacts-cache), which mirrors the bucket as
`<cache>/<bucket>/<prefix>/<batch_id>/<job_id>/`. This module moves those directories to and from
the bucket, with the guarantee of the local rename: a reader never takes a half-written directory.

- A job directory `<prefix>/<batch_id>/<job_id>/` is uploaded file by file under its final name,
  and its manifest (`_manifest.json`: every file and its size) is written last. The manifest is the
  commit: readers take only directories that have one. A new upload first deletes the manifest, then
  every object under the directory, so what a writer killed mid-upload leaves is never trusted, and
  the next writer removes it.
- A training checkpoint `<prefix>/<batch_id>/.<job_id>.checkpoint/` is uploaded under a new
  sub-prefix named by its commit id; then the manifest is replaced to point at it, then older
  sub-prefixes go. A writer killed mid-upload leaves the previous checkpoint committed, so a job
  resumes on another host from the last checkpoint that was uploaded whole.

Readers download a committed directory into the cache (a copy whose manifest matches the bucket's
is reused) and load it as any local job directory. Endpoint and credentials come from the usual
AWS variables: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobs.settings import OBJECT_STORE_SCHEME, ObjectStoreDir
from worker.artifacts import replace_directory
from worker.errors import JobError, TransientError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
CACHE_ENV = "GRAFTQ_ARTIFACTS_CACHE"
DEFAULT_CACHE = "graftq-data/artifacts-cache"
CHECKPOINT_STATE = "trainer_state.json"


class StorageUnavailable(TransientError):
    """The object store could not be reached; a retry may succeed."""


#: what `local_copy` raises when a directory cannot be read
READ_ERRORS = (JobError, TransientError)


def is_remote(location: str | Path | None) -> bool:
    return location is not None and str(location).startswith(OBJECT_STORE_SCHEME)


def cache_root() -> Path:
    """This host's artifacts cache (GRAFTQ_ARTIFACTS_CACHE), absolute."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().absolute()


def local_mirror(url: str) -> Path:
    """The directory of the cache that mirrors `url` (`s3://bucket/key`). Raises JobError for a URL
    with empty, `.` or `..` parts."""
    parts = str(url).removeprefix(OBJECT_STORE_SCHEME).split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise JobError(f"{url} is not an artifacts URL graftq writes (empty, `.` or `..` parts)")
    return cache_root().joinpath(*parts)


def local_root(artifacts_root: str | Path) -> Path:
    """Where this host writes the jobs of `artifacts_root`: the directory itself, or its mirror in the
    cache for `s3://`."""
    return local_mirror(str(artifacts_root)) if is_remote(artifacts_root) else Path(artifacts_root)


def local_copy(location: str | Path) -> Path:
    """A local directory with the contents of the job directory at `location`: the path itself, or, for
    `s3://`, its committed copy downloaded into the cache. Raises JobError when nothing is committed
    there, StorageUnavailable when the store cannot be reached."""
    if not is_remote(location):
        return Path(location)
    url = str(location).rstrip("/")
    return download(url, local_mirror(url))


# -- the writer's side ---------------------------------------------------------------------------


class JobStore:
    """Takes a job's artifacts and checkpoints from the local directories the pipeline writes to the
    artifacts directory: for a local artifacts directory every method does nothing."""

    def __init__(self, artifacts_root: str | Path, batch_id: str, job_id: str):
        self.remote = is_remote(artifacts_root)
        if self.remote:
            root = ObjectStoreDir(str(artifacts_root).rstrip("/"))
            self.job_url = root / batch_id / job_id
            self.checkpoint_url = root / batch_id / f".{job_id}.checkpoint"

    def check_access(self) -> None:
        """Raise JobError now, before any training, when the bucket is missing or the credentials are
        refused (a listing needs what a commit needs)."""
        if not self.remote:
            return
        with _storage_errors("checking access to", self.job_url) as fs:
            _objects(fs, self.job_url)

    def publish(self, job_dir: Path) -> Path | ObjectStoreDir:
        """Commit the finished `job_dir` and return where the job's artifacts are recorded: `job_dir`,
        or its URL (`job_dir` stays, as this host's cached copy of the commit)."""
        if not self.remote:
            return job_dir
        with _storage_errors("uploading the job's artifacts to", self.job_url) as fs:
            manifest = _commit_in_place(fs, job_dir, self.job_url)
        (job_dir / MANIFEST).write_text(json.dumps(manifest))
        log.info("artifacts committed to %s", self.job_url)
        return self.job_url

    def amend(self, job_dir: Path) -> None:
        """Upload what was added to the published `job_dir` since (the trackers' output) and commit it
        with a new manifest; the files already committed stay as they are. A failure only logs: the
        job's artifacts are committed already."""
        if not self.remote:
            return
        manifest = json.loads((job_dir / MANIFEST).read_text())
        try:
            with _storage_errors("uploading the job's tracker files to", self.job_url) as fs:
                added = _put_tree(fs, job_dir, self.job_url, skip=set(manifest["files"]))
                if not added:
                    return
                manifest = {**manifest, "files": {**manifest["files"], **added}, "commit": uuid.uuid4().hex}
                _write_manifest(fs, self.job_url, **manifest)
        except (JobError, TransientError) as error:
            log.warning("%s; they stay in %s on this host", error, job_dir)
            return
        (job_dir / MANIFEST).write_text(json.dumps(manifest))

    def checkpoint_saved(self, checkpoint_dir: Path) -> None:
        """Upload the checkpoint the trainer has just written to `checkpoint_dir`. An unreachable store
        only logs: training goes on, and the next checkpoint tries again."""
        if not self.remote:
            return
        step = _checkpoint_step(checkpoint_dir)
        try:
            with _storage_errors("uploading the training checkpoint to", self.checkpoint_url) as fs:
                _commit_versioned(fs, checkpoint_dir, self.checkpoint_url, step=step)
        except StorageUnavailable as error:
            log.warning("%s; the checkpoint stays on this host only", error)
            return
        log.info("checkpoint at step %s committed to %s", step, self.checkpoint_url)

    def restore_checkpoint(self, checkpoint_dir: Path) -> None:
        """Put the bucket's committed checkpoint in `checkpoint_dir` when it is further along than the
        local one (or there is none here): the job resumes from it."""
        if not self.remote:
            return
        with _storage_errors("reading the training checkpoint at", self.checkpoint_url) as fs:
            manifest = _read_manifest(fs, self.checkpoint_url)
        if manifest is None or manifest.get("step", 0) <= _checkpoint_step(checkpoint_dir):
            return
        download(self.checkpoint_url, checkpoint_dir)
        log.info("checkpoint at step %s downloaded from %s", manifest.get("step"), self.checkpoint_url)

    def discard_checkpoint(self) -> None:
        """Remove the job's checkpoint from the bucket (the job has succeeded). Failure only logs."""
        if not self.remote:
            return
        try:
            with _storage_errors("removing the training checkpoint at", self.checkpoint_url) as fs:
                _remove_tree(fs, self.checkpoint_url)
        except (JobError, TransientError) as error:
            log.warning("%s", error)


def _checkpoint_step(checkpoint_dir: Path) -> int:
    try:
        return int(json.loads((checkpoint_dir / CHECKPOINT_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _key(url: str) -> str:
    return url.removeprefix(OBJECT_STORE_SCHEME)


def _put_tree(fs: Any, local_dir: Path, url: str, skip: Collection[str] = ()) -> dict[str, int]:
    """Upload every file under `local_dir` to `url` but those in `skip`; return {relative path: size}."""
    files = {}
    for path in sorted(local_dir.rglob("*")):
        relative = path.relative_to(local_dir).as_posix()
        if not path.is_file() or relative == MANIFEST or relative in skip:
            continue
        fs.put_file(str(path), f"{_key(url)}/{relative}")
        files[relative] = path.stat().st_size
    return files


def _write_manifest(fs: Any, url: str, **fields: Any) -> dict[str, Any]:
    """Write the manifest (`files`, `commit`, `root` and any other `fields`) that commits `url`; return it."""
    manifest = {"format": 1, **fields, "committed_at": datetime.now(UTC).isoformat()}
    fs.pipe_file(f"{_key(url)}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _read_manifest(fs: Any, url: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(f"{_key(url)}/{MANIFEST}"))
    except FileNotFoundError:
        return None


def _objects(fs: Any, url: str) -> list[str]:
    """The keys under `url`; not `url` itself, which a store with real directories lists while it exists."""
    return [key for key in fs.find(_key(url) + "/") if key != _key(url)]


def _remove_tree(fs: Any, url: str) -> None:
    """Uncommit `url` (its manifest goes first), then remove every object under it."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(f"{_key(url)}/{MANIFEST}")
    objects = _objects(fs, url)
    if objects:
        fs.rm(objects)


def _commit_in_place(fs: Any, local_dir: Path, url: str) -> dict[str, Any]:
    _remove_tree(fs, url)
    files = _put_tree(fs, local_dir, url)
    return _write_manifest(fs, url, files=files, commit=uuid.uuid4().hex, root="")


def _commit_versioned(fs: Any, local_dir: Path, url: str, **fields: Any) -> None:
    commit = uuid.uuid4().hex
    files = _put_tree(fs, local_dir, f"{url}/{commit}")
    _write_manifest(fs, url, files=files, commit=commit, root=commit, **fields)
    keep = (f"{_key(url)}/{commit}/", f"{_key(url)}/{MANIFEST}")
    stale = [key for key in _objects(fs, url) if not key.startswith(keep)]
    if stale:  # earlier checkpoints, and what a writer killed mid-upload left
        fs.rm(stale)


# -- the reader's side ---------------------------------------------------------------------------


def download(url: str, local_dir: Path, attempts: int = 3) -> Path:
    """Make `local_dir` a copy of the directory committed at `url` and return it; a copy that already
    holds the same commit is kept. Raises JobError when nothing is committed at `url`."""
    for _ in range(attempts):
        with _storage_errors("reading", url) as fs:
            manifest = _read_manifest(fs, url)
            if manifest is None:
                raise JobError(f"{url} holds no committed graftq directory (no {MANIFEST}): it was never "
                               "uploaded, its upload was interrupted, or it was removed")
            if _local_commit(local_dir) == manifest["commit"]:
                return local_dir
            fetched = _fetch(fs, url, manifest, local_dir)
        if fetched:
            return local_dir
    raise JobError(f"{url} was replaced {attempts} times while it was being read; try again")


def _local_commit(local_dir: Path) -> str | None:
    try:
        return json.loads((local_dir / MANIFEST).read_text()).get("commit")
    except (OSError, ValueError):
        return None


def _fetch(fs: Any, url: str, manifest: dict[str, Any], local_dir: Path) -> bool:
    """Download the commit `manifest` names into `local_dir`; False when a writer replaced it meanwhile."""
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = local_dir.with_name(f".{local_dir.name}.fetch-{uuid.uuid4().hex[:8]}")
    source = f"{url}/{manifest['root']}" if manifest.get("root") else url
    try:
        for relative, size in manifest["files"].items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{_key(source)}/{relative}", str(target))
            if target.stat().st_size != size:
                return False
        again = _read_manifest(fs, url)
        if again is None or again["commit"] != manifest["commit"]:
            return False
        (staging / MANIFEST).write_text(json.dumps(manifest))
        replace_directory(staging, local_dir)
        staging = None
        return True
    except FileNotFoundError:  # a writer removed it after we read the manifest
        return False
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# -- the store -----------------------------------------------------------------------------------


_AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_DEFAULT_REGION", "AWS_PROFILE")
_clients: dict[tuple, Any] = {}


def _filesystem() -> Any:
    """An s3fs filesystem for the AWS variables of the environment, one per process: a client made
    before a fork (Celery's pool) is not used after it."""
    try:
        import s3fs
    except ImportError:
        raise JobError("the artifacts directory is in S3-compatible storage (s3://), which needs the s3 "
                       "extra: pip install 'graftq[s3]'") from None
    key = (os.getpid(), *(os.environ.get(name) for name in _AWS_VARS))
    if key not in _clients:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        # no listings cache: a commit is seen the moment its manifest is written
        _clients[key] = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                                          use_listings_cache=False)
    return _clients[key]


@contextlib.contextmanager
def _storage_errors(doing: str, url: str) -> Iterator[Any]:
    """Yield an S3 filesystem; turn what it raises into JobError (a setting to fix) or
    StorageUnavailable (worth a retry), each naming `url` and what was being done."""
    bucket = ObjectStoreDir(url).bucket
    try:
        yield _filesystem()
    except (JobError, TransientError):
        raise
    except PermissionError as error:
        raise JobError(f"{doing} {url}: access denied ({error}); check AWS_ACCESS_KEY_ID / "
                       f"AWS_SECRET_ACCESS_KEY and that they may read and write bucket {bucket}") from None
    except FileNotFoundError as error:
        raise JobError(f"{doing} {url}: {error}; does bucket {bucket} exist at "
                       f"{_endpoint_shown()}? Create it, or fix GRAFTQ_ARTIFACTS_DIR") from None
    except Exception as error:
        if not _unreachable(error):
            raise
        raise StorageUnavailable(f"{doing} {url}: cannot reach the object store at {_endpoint_shown()} "
                                 f"({type(error).__name__}: {error})") from error


def _endpoint_shown() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _unreachable(error: BaseException) -> bool:
    """True for connection failures: the store is down or the network is, not a setting."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return isinstance(error, OSError)
    return isinstance(error, OSError | BotoConnectionError | HTTPClientError)
