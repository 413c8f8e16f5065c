"""All storage access: listing, reading, writing and publishing through fsspec, so a local folder, `file://`
and object stores (`s3://`, `gs://`) behave the same.

FFmpeg reads and writes local files only here: `ffmpeg_input` hands it a local path, a presigned URL where the
filesystem can sign one, or a staged local copy; FFmpeg writes into a local staging folder and `publish`
moves the result to its URI (an atomic rename on local disks, one upload on object stores).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import logging
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

import fsspec
import fsspec.asyn
import fsspec.config
from fsspec.implementations.local import LocalFileSystem

JOB_AREA = "_reelmend"

log = logging.getLogger(__name__)
T = TypeVar("T")

# Backoff before each retry of a storage call that failed transiently: about a minute in all, which outlasts
# a store's throttling or a dropped connection (s3fs and botocore retry for only ~4 s by themselves) but not a
# real outage. Each wait is jittered, so many workers do not retry in step.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# What a store answers for throttling, 5xx and broken connections, after s3fs's translation (s3fs/errors.py:
# 503 and SlowDown become EBUSY); a missing key, a refused permission or a bad request is permanent.
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EPIPE, errno.EIO, errno.EREMOTEIO}


TRANSIENT_CLASSES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                     "ResponseStreamingError", "ClientConnectionError", "ClientConnectorError",
                     "ServerDisconnectedError", "ClientPayloadError", "ClientOSError", "ServerTimeoutError"}


def is_transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError):
        return err.errno in TRANSIENT_ERRNOS
    # botocore's and aiohttp's connection errors when they escape s3fs untranslated (not their credential or
    # parameter errors, which no wait cures)
    return type(err).__name__ in TRANSIENT_CLASSES


def retrying(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry `fn` with jittered exponential backoff while it fails transiently; a permanent error (or the
    last transient one) propagates, and fails the one video or commit that needed it."""

    @functools.wraps(fn)
    def call(*args, **kwargs) -> T:
        for delay in (*RETRY_DELAYS, None):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if delay is None or not is_transient(err):
                    raise
                log.warning("storage: %s failed (%s); retrying in %.1f s", fn.__name__, err, delay)
                time.sleep(delay * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    return call


_configured: set[str] = set()  # protocols whose defaults `configure` set, so the next job can clear them


def configure(options: dict[str, dict]) -> None:
    """Make `options` (fsspec keyword arguments per protocol) the defaults of every filesystem this process
    opens from now on, and drop those an earlier job in this process set. Each Ray task and actor that
    touches storage calls it with its job's options (a pooled worker may have served another job)."""
    for protocol in _configured - set(options):
        fsspec.config.conf.pop(protocol, None)
    for protocol, kwargs in options.items():
        fsspec.config.conf[protocol] = dict(kwargs)
    _configured.clear()
    _configured.update(options)


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', refusing any part that would climb out of `base`."""
    for part in parts:
        if safe_relative(part) != part.strip("/"):
            raise ValueError(f"unsafe path component {part!r}")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def safe_relative(rel: str) -> str:
    """Normalise a relative key so it cannot escape its destination ('..', absolute, empty or '.' parts)."""
    # Only '/' separates: a backslash is an ordinary character in POSIX names and object keys.
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise ValueError(f"object key {rel!r} would escape the destination")
    return posixpath.join(*parts)


def check_folder(uri: str, what: str) -> None:
    """Refuse a `uri` that names a file where a folder (made if missing) is wanted, before any work."""
    fs, path = fs_and_path(uri)
    if fs.isfile(path):
        raise ValueError(f"{what} {uri} is a file, not a folder: give a folder (it is created if missing)")


def check_file(uri: str, what: str) -> None:
    """Refuse a `uri` that names a folder where a file is to be written, before any work."""
    fs, path = fs_and_path(uri)
    if fs.isdir(path):
        raise ValueError(f"{what} {uri} is a folder: give a file name (e.g. {uri.rstrip('/')}/report.html)")


def is_local(uri: str) -> bool:
    return isinstance(fs_and_path(uri)[0], LocalFileSystem)


class Listed(NamedTuple):
    uri: str
    rel: str  # the path below SRC
    version: str  # what identifies this content of the file (see `version_of`)


class SourceMissing(FileNotFoundError):
    """SRC itself does not exist. (A file under it that vanishes or dangles is listed, and fails alone.)"""


@retrying
def list_files(src: str) -> list[Listed]:
    """Every file under `src`, recursively, sorted; skips reelmend's job areas. One listing call per page of
    names: the versions come with it (an object store lists ETags), never a request per file."""
    fs, root = fs_and_path(src)
    fs.invalidate_cache(root)  # other processes add and replace files there
    if not fs.exists(root):
        raise SourceMissing(f"source {src} does not exist")
    protocol = src.split("://", 1)[0] + "://" if "://" in src else ""
    local = not protocol or protocol == "file://"
    if fs.isfile(root):
        return [Listed(src, posixpath.basename(root), _version(fs, root, fs.info(root)))]
    out = []
    prefix = root.rstrip("/") + "/"
    for path, info in sorted(fs.find(root, detail=True).items()):
        # Literally the part after SRC: relpath would resolve an object key's '..' ("x/../a.mp4" is a key of
        # its own, not "a.mp4"), which the plan then refuses.
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root)
        if rel.split("/", 1)[0] == JOB_AREA:
            continue
        out.append(Listed(path if local else f"{protocol}{path}", rel, _version(fs, path, info)))
    return out


def _version(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> str:
    """`version_of` the listed file; on a local disk, of what it links to (a listing describes a symlink itself,
    which is not what FFmpeg reads)."""
    if isinstance(fs, LocalFileSystem):
        try:
            st = os.stat(path)  # follows links
        except OSError:  # a dangling link, or a file gone since the listing: its probe fails, and with it the file
            return version_of(info)
        return version_of({"size": st.st_size, "mtime": st.st_mtime})
    return version_of(info)


# The field of a listing that changes whenever a file's content does, by store: an object's ETag (S3, Azure),
# its generation (GCS), a file's modification time (local disks, SFTP), when it was written (memory://).
# (GCS's generation before its etag, which also changes when only metadata does)
VERSION_FIELDS = ("ETag", "generation", "etag", "mtime", "LastModified", "last_modified", "updated", "created")


def version_of(info: dict) -> str:
    """A file's size and its store's version field: equal strings mean the same content, as far as the store
    can tell without reading it (a file rewritten within the same second of mtime, same size, is not seen)."""
    key = next((k for k in VERSION_FIELDS if info.get(k) not in (None, "")), None)
    if key is None:
        return f"size={info.get('size')}"
    value = info[key]
    if isinstance(value, datetime.datetime):  # one store may give a listing's times as numbers, its info's as dates
        value = value.timestamp()
    return f"size={info.get('size')} {key}={value}"


class SourceChanged(ValueError):
    """The source is not the file the job planned: chunks of two versions must never make one output."""


@retrying
def check_version(uri: str, version: str) -> None:
    """Raise SourceChanged unless `uri` is still the file listed with `version` (no check when the plan
    predates versions: empty)."""
    if not version:
        return
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    try:
        now = _version(fs, path, fs.info(path))
    except FileNotFoundError:
        raise SourceChanged("the source is gone since the job planned it") from None
    if now != version:
        raise SourceChanged(f"the source changed since the job planned it ({version} then, {now} now); re-run "
                            "`reelmend restore` with the same arguments to restore it as it is now")


@retrying
def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


@retrying
def ls(uri: str) -> list[str]:
    """Names directly under `uri` (empty when it does not exist). Never a cached listing: other processes
    write there (s3fs and gcsfs cache directory listings per filesystem instance)."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@retrying
def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


@retrying
def read_many(uris: list[str]) -> list[bytes]:
    """Several small objects of one store, in order. Object stores fetch them concurrently (one `cat` call):
    reading a long job's manifest parts one by one would cost a round trip each."""
    if not uris:
        return []
    fs, _ = fs_and_path(uris[0])
    paths = [fs_and_path(u)[1] for u in uris]
    found = fs.cat(paths, on_error="raise")
    return [found[p] for p in paths] if isinstance(found, dict) else [found]


@retrying
def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object so that readers see either nothing or all of it."""
    fs, path = fs_and_path(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _hidden_tmp(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:  # a failed write (disk full) leaves no hidden temporary behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)  # a single PUT: object stores publish whole objects


@retrying
def create_exclusive(uri: str, data: bytes) -> bool:
    """Create a small object only if nothing exists at `uri`; False when something does. Object stores do
    this with a conditional PUT (If-None-Match: *), which s3fs sends for mode "xb"."""
    fs, path = fs_and_path(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    except OSError as err:  # a store that answers 412 without naming the condition (s3fs then says EINVAL)
        if _precondition_failed(err) or "PreconditionFailed" in str(err) or "412" in str(err):
            return False
        raise
    return True


@retrying
def read_with_etag(uri: str) -> tuple[bytes, str | None]:
    """A small object and the ETag it was read at, for `replace_if_match`. The ETag is None where writes cannot
    be made conditional on it here: local files and object stores other than S3."""
    fs, path = fs_and_path(uri)
    if not _is_s3(fs):
        with fs.open(path, "rb") as f:
            return f.read(), None
    bucket, key, _ = fs.split_path(path)
    return fsspec.asyn.sync(fs.loop, _get_object, fs, bucket, key)


async def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str]:
    # One GET, so the bytes and the ETag are of the same version (a HEAD, then a GET, could straddle a write).
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return await response["Body"].read(), response["ETag"]
    finally:
        response["Body"].close()


@retrying
def replace_if_match(uri: str, data: bytes, etag: str) -> str | None:
    """Write a small object over the version whose ETag is `etag`; the new ETag, or None when the object has
    changed or gone since. S3 only: a conditional PUT (If-Match: etag), so of two writers holding the same ETag
    exactly one succeeds (https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-requests.html)."""
    fs, path = fs_and_path(uri)
    if not _is_s3(fs):
        raise ValueError(f"{uri}: conditional writes on an ETag need S3 (read_with_etag gave no ETag)")
    bucket, key, _ = fs.split_path(path)
    try:
        response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
    except FileNotFoundError:  # S3 answers 404, not 412, when nothing is left to match
        return None
    except OSError as err:
        if _precondition_failed(err):
            return None
        raise  # 409 ConditionalRequestConflict (a concurrent write) comes as EIO, retried: the retry gets 412 or wins
    finally:
        fs.invalidate_cache(path)  # s3fs's cached listing of the folder no longer holds this object's details
    return response["ETag"]


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    from s3fs import S3FileSystem  # imported on use: a run on local files need not load botocore

    return isinstance(fs, S3FileSystem)


def _precondition_failed(err: OSError) -> bool:
    """Whether the store answered 412: s3fs makes it a bare EINVAL, with botocore's error as its cause."""
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


def _hidden_tmp(path: str) -> str:
    """A temporary sibling whose leading dot keeps dataset readers (pyarrow, DuckDB) from listing it."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


@retrying
def remove(uri: str) -> None:
    fs, path = fs_and_path(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def staging_dir(near: str) -> Iterator[Path]:
    """A private local folder for FFmpeg's outputs, removed afterwards. For a local destination it lies on the
    destination's filesystem (inside `near`), so publishing is a rename, not a copy."""
    fs, path = fs_and_path(near)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".staging-", dir=path)
    else:
        tmp = tempfile.mkdtemp(prefix="reelmend-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_staging(uri: str) -> None:
    """Remove staging folders a killed run left under a local job area (object stores stage in /tmp)."""
    fs, path = fs_and_path(uri)
    if isinstance(fs, LocalFileSystem) and os.path.isdir(path):
        for folder in Path(path).rglob(".staging-*"):
            shutil.rmtree(folder, ignore_errors=True)


class WriteError(OSError):
    """A finished file that could not be stored: says where, and what the store answered."""


def publish(local: Path, uri: str) -> None:
    """Move a finished local file to `uri` atomically: readers never see a partial output. Transient errors are
    retried; what remains (a refused write, a full disk) raises WriteError naming `uri` and the store's answer:
    the reason a user reads in the manifest."""
    try:
        _publish(local, uri)
    except OSError as err:
        raise WriteError(f"cannot write {uri}: {type(err).__name__}: {' '.join(str(err).split())}") from err


@retrying
def _publish(local: Path, uri: str) -> None:
    fs, path = fs_and_path(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(local, path)
        except OSError:  # another filesystem: copy beside the target, then rename
            tmp = _hidden_tmp(path)
            try:
                shutil.copyfile(local, tmp)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
    elif set([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol) & WHOLE_OBJECT_PUTS:
        fs.put_file(str(local), path)  # one PUT, or a multipart upload that appears when completed
    else:  # a filesystem reached over the network (sftp, webdav, hdfs): beside the target, then renamed
        tmp = _hidden_tmp(path)
        try:
            fs.put_file(str(local), tmp)
            fs.mv(tmp, path)
        finally:
            with contextlib.suppress(Exception):
                if fs.exists(tmp):
                    fs.rm(tmp)


# Stores whose writes appear whole or not at all (object stores), so an output is written straight to its key.
WHOLE_OBJECT_PUTS = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "memory"}


@contextlib.contextmanager
def ffmpeg_input(uri: str, stage_in: Path | None = None, version: str = "") -> Iterator[str]:
    """Something FFmpeg can open for `uri`: a local path, a presigned HTTP URL (FFmpeg then reads only the
    byte ranges it needs), or else a local copy: with the file's `version` (from its listing), the node's
    shared copy of that version (`_shared_copy`: one download per node, whichever tasks read it), without, a
    copy of its own staged in `stage_in`."""
    fs, path = fs_and_path(uri)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    url = _presigned_url(fs, path)
    if url is not None:
        yield url
        return
    if version:
        with _shared_copy(fs, path, version) as local:
            yield local
        return
    with contextlib.ExitStack() as stack:
        folder = stage_in or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reelmend-in-")))
        local = folder / f"{uuid.uuid4().hex}{posixpath.splitext(path)[1]}"
        retrying(fs.get_file)(path, str(local))
        try:
            yield str(local)
        finally:
            local.unlink(missing_ok=True)


def copies_root() -> Path:
    """Where a node keeps its shared copies of sources read from stores that cannot sign URLs."""
    return Path(os.environ.get("REELMEND_COPIES_DIR") or Path(tempfile.gettempdir()) / "reelmend-copies")


def copies_budget() -> int:
    """The bytes of shared copies a node keeps (REELMEND_COPIES_GB, default 20) beyond those being read."""
    return int(float(os.environ.get("REELMEND_COPIES_GB", "20")) * 2**30)


@contextlib.contextmanager
def _shared_copy(fs: fsspec.AbstractFileSystem, path: str, version: str) -> Iterator[str]:
    """The node's local copy of `path` at `version`, downloaded by the first task that needs it while the others
    wait (an exclusive lock on the copy's lock file), then read under a shared lock. Copies beyond
    `copies_budget()` go, least recently read first, but never one being read: the disk holds the budget plus
    the sources being read at the time. A new version of the file is a new copy (the old one ages out)."""
    import fcntl

    root = copies_root()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{fs.protocol}\0{path}\0{version}".encode()).hexdigest()[:32]
    local = root / f"{key}{posixpath.splitext(path)[1]}"
    with open(root / f"{key}.lock", "a") as lock:
        while True:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not local.exists():
                    partial = root / f".{key}.{uuid.uuid4().hex}.part"
                    try:
                        retrying(fs.get_file)(path, str(partial))
                        os.replace(partial, local)
                    finally:
                        partial.unlink(missing_ok=True)
                    _trim_copies(root, keep=local)
                os.utime(local)  # read now: the last to go
            except BaseException:
                fcntl.flock(lock, fcntl.LOCK_UN)
                raise
            # Readers share the lock; a trim takes it exclusively, so never while one reads. (Linux converts a
            # lock by releasing it first: a trim may slip in between, so the copy is looked for again.)
            fcntl.flock(lock, fcntl.LOCK_SH)
            if local.exists():
                break
        yield str(local)


def _trim_copies(root: Path, keep: Path) -> None:
    """Remove the least recently read copies until those left fit `copies_budget()`; a copy being read (its
    lock held by a reader) stays."""
    import fcntl

    def is_lock(p: Path) -> bool:  # "<32 hex>.lock", whatever the copies' own extensions are
        return len(p.name) == 37 and p.name.endswith(".lock")

    copies = []
    for p in root.iterdir():
        if not p.name.startswith(".") and not is_lock(p):
            with contextlib.suppress(FileNotFoundError):  # another node-mate's trim took it meanwhile
                st = p.stat()
                copies.append((st.st_mtime, st.st_size, p))
    total, budget = sum(size for _, size, _ in copies), copies_budget()
    for _, size, copy in sorted(copies, key=lambda c: c[0]):
        if total <= budget:
            return
        if copy == keep:
            continue
        lock_path = root / f"{copy.name[:32]}.lock"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being read
            copy.unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)
            total -= size


_unsigned: set = set()  # the protocols a warning already said cannot sign, once per process


def _presigned_url(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """An HTTP(S) URL FFmpeg can read with range requests, when the filesystem can sign one (fsspec's `sign`:
    s3fs always, gcsfs with service-account credentials). A plain `url()` is not enough: gcsfs's is unsigned,
    which a private bucket refuses."""
    try:
        # Valid for the longest single FFmpeg read (a packet scan or stitch of a long source over HTTP, which
        # reconnects with the same URL); never logged (FFmpeg's errors are redacted). Temporary credentials
        # (an instance profile's) may end it sooner.
        url = fs.sign(path, expiration=6 * 3600)
    except Exception as err:  # noqa: BLE001 - cannot sign (not implemented, credentials that cannot): copy it
        if fs.protocol not in _unsigned:
            _unsigned.add(fs.protocol)
            log.warning("storage: %s URLs cannot be signed (%s: %s): FFmpeg reads local copies of the sources",
                        fs.protocol, type(err).__name__, " ".join(str(err).split())[:200])
        return None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None
