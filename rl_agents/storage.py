"""Where runs and policies live: a local (or mounted, shared) path, or a pyarrow filesystem URI.

    train.storage_path: s3://bucket/runs                      # AWS credentials from the usual env/files
    train.storage_path: "s3://bucket/runs?endpoint_override=minio:9000&scheme=http"   # MinIO, Ceph
    train.storage_path: gs://bucket/runs                      # Google Cloud Storage

A URI is anything `pyarrow.fs.FileSystem.from_uri` opens (`s3://`, `gs://`, `hdfs://`, `abfs://`);
its query string (S3 options such as `endpoint_override`, `region`, `scheme`) stays with every
location made from it by `join`. `file://` URIs are local paths. Every node reaches a URI by itself,
so no node needs to read another's disk. Credentials come from each node's environment (or instance
role), never from the URI: one with `user:secret@` is refused, since URIs are written into
state.json, logs and `policy.uri`.

The functions take a local path or a URI. A failed write raises `rl_agents.fileio.WriteError`
naming the location; a failed upload removes the object it was writing (pyarrow would otherwise
complete a truncated one). A checkpoint counts only once its `trainer/COMPLETE` is there
(`rl_agents.train.checkpoint`); a policy is named (state.json, `policy.uri`) only after its upload
finished. Reading a policy or a checkpoint from a URI copies it into a node-local cache first (`local_copy`,
one download per node under a file lock, the newest `CACHE_KEEP` kept): the loaders (transformers,
vLLM, DeepSpeed) then read local files.

Tested against a real S3 API (moto's server) in tests/rl_agents/test_storage.py; Google Cloud
Storage and HDFS go through the same pyarrow calls but are not tested here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from rl_agents.fileio import atomic_write_text, write_error

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CACHE_DIR = "rl_agents-weights"  # under $TMPDIR; shared with rl_agents.cluster.Weights' copies
CACHE_KEEP = 3
"""URI copies a node keeps (the newest by use): the policy in use, the one before, and the base."""


def scheme(location: str | os.PathLike) -> str | None:
    m = _SCHEME.match(str(location))
    return m.group(1).lower() if m else None


def is_uri(location: str | os.PathLike) -> bool:
    """True for a filesystem URI other than `file://` (which is a local path)."""
    return scheme(location) not in (None, "file")


def local_path(location: str | os.PathLike) -> str:
    """A local path or `file://` URI as an absolute path (`~` expanded)."""
    s = str(location)
    if scheme(s) == "file":
        s = s[len("file://"):]
    return os.path.abspath(os.path.expanduser(s))


def normalize(location: str | os.PathLike) -> str:
    """A URI as given; a local path absolute."""
    return str(location) if is_uri(location) else local_path(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...`; a URI keeps its query string at the end."""
    if not is_uri(location):
        return os.path.join(local_path(location), *parts)
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def name(location: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


@lru_cache(maxsize=16)
def _root_fs(root: str):
    """(filesystem, its path) of `scheme://netloc?query`: one filesystem per bucket and options (S3
    without a region asks the bucket's region once, not per location)."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(root)
    except (ValueError, TypeError, OSError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise ValueError(f"{root}: not a filesystem URI pyarrow can open ({e})") from None


def filesystem(location: str | os.PathLike):
    """(pyarrow FileSystem, path in it) of a URI or a local path."""
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), local_path(location)
    base, sep, query = str(location).partition("?")
    m = re.match(r"^([^:]+://[^/]*)(/.*)?$", base)
    fs, root = _root_fs(m.group(1) + sep + query)
    rest = (m.group(2) or "").strip("/")
    return fs, (f"{root.rstrip('/')}/{rest}" if rest else root)


URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""The URI schemes pyarrow opens (besides `file://`)."""


def check_uri(location: str) -> None:
    """ValueError unless `location` is a URI of a scheme pyarrow opens, without credentials in it
    (nothing is contacted)."""
    s = scheme(location)
    if s is not None and s not in (*URI_SCHEMES, "file"):
        raise ValueError(f"{location}: {s}:// is not a filesystem pyarrow opens ({', '.join(URI_SCHEMES)}, file)")
    if s is not None and "@" in str(location).partition("://")[2].split("/", 1)[0]:
        raise ValueError(f"{s}://...@...: no credentials in the URI (it is written into state.json, logs and "
                         "policy.uri); give them to every node's environment (e.g. AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or an instance role")


def probe(location: str) -> None:
    """Write, read back and delete a small object under the URI `location`: `ValueError` saying what
    failed (bucket, endpoint or credentials wrong), before any work depends on the store."""
    check_uri(location)
    marker = join(location, f".rl_agents-probe-{os.getpid()}")
    try:
        write_text(marker, "probe\n")
        if read_text(marker) != "probe\n":
            raise OSError(f"{marker} read back other bytes than were written")
        fs, path = filesystem(marker)
        fs.delete_file(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{location}: cannot write, read and delete an object there ({e})") from None


def _info(location: str):
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return os.path.exists(local_path(location))
    import pyarrow.fs

    return _info(str(location)).type != pyarrow.fs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return os.path.isfile(local_path(location))
    import pyarrow.fs

    return _info(str(location)).type == pyarrow.fs.FileType.File


def list_dirs(location: str | os.PathLike) -> list[str]:
    """Names of the directories directly under `location` ([] if it does not exist)."""
    if not is_uri(location):
        p = Path(local_path(location))
        return sorted(d.name for d in p.iterdir() if d.is_dir()) if p.is_dir() else []
    import pyarrow.fs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


def read_text(location: str | os.PathLike) -> str:
    """A file's text; FileNotFoundError naming it when there is none."""
    if not is_uri(location):
        return Path(local_path(location)).read_text(encoding="utf-8")
    if not is_file(location):
        raise FileNotFoundError(f"{location}: no such file")
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write a whole file: atomically (rename) on a local path, one object upload on a URI."""
    if not is_uri(location):
        atomic_write_text(local_path(location), text)
        return
    fs, path = filesystem(location)
    try:
        out = fs.open_output_stream(path)
        try:
            out.write(text.encode("utf-8"))
        except BaseException:
            out.close()
            _delete_quietly(fs, path)
            raise
        out.close()
    except OSError as e:
        raise write_error(location, e) from None


def delete_dir(location: str | os.PathLike) -> None:
    """Remove a directory and everything under it (nothing if there is none); `WriteError` naming it."""
    if not is_uri(location):
        shutil.rmtree(local_path(location), ignore_errors=True)
        return
    try:
        if exists(location):
            fs, path = filesystem(location)
            fs.delete_dir(path)
    except OSError as e:
        raise write_error(location, e) from None


def _delete_quietly(fs, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass


def upload(local_dir: str | os.PathLike, location: str | os.PathLike, fault=None) -> None:
    """Copy every file under `local_dir` to the URI `location` (merged with what is there), one
    object per file. `fault(target)` (testing hook) runs half-way through. `WriteError` names the
    file that failed."""
    src = Path(local_dir)
    fs, root = filesystem(location)
    files = sorted(f for f in src.rglob("*") if f.is_file())
    for k, f in enumerate(files):
        rel = f.relative_to(src).as_posix()
        target = join(location, rel)
        try:
            if fault is not None and k == len(files) // 2:
                fault(target)
            _put(fs, f"{root.rstrip('/')}/{rel}", f)
        except OSError as e:
            raise write_error(target, e) from None


def _put(fs, path: str, src: Path) -> None:
    """Upload one file; on any failure the object is removed (closing the stream would complete a
    truncated upload)."""
    out = fs.open_output_stream(path)
    try:
        with open(src, "rb") as fin:
            shutil.copyfileobj(fin, out, 8 << 20)
    except BaseException:
        try:
            out.abort() if hasattr(out, "abort") else out.close()
        finally:
            _delete_quietly(fs, path)
        raise
    out.close()


def upload_policy(local_dir: str | os.PathLike, location: str | os.PathLike) -> None:
    """Put a policy (an HF checkpoint directory) at the URI `location`, replacing what is there."""
    delete_dir(location)
    upload(local_dir, location)


def download(location: str | os.PathLike, local_dir: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Copy the files under the URI `location` into `local_dir`, leaving out the top-level names in
    `skip` (e.g. a checkpoint's `trainer/` state when only the weights are wanted). A failed local
    write raises `WriteError` naming the file."""
    import pyarrow.fs

    fs, root = filesystem(location)
    root = root.rstrip("/")
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        rel = info.path[len(root) + 1:]
        if rel.split("/", 1)[0] in skip:
            continue
        out = Path(local_dir) / rel
        with fs.open_input_stream(info.path) as fin:  # a store error: pyarrow's OSError, as raised
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "wb") as fout:
                    while chunk := fin.read(8 << 20):
                        fout.write(chunk)
            except OSError as e:
                raise write_error(out, e) from None


def _listing(location: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{path relative to `location`: (size, mtime ns)} of every file under a directory."""
    import pyarrow.fs

    fs, root = filesystem(location)
    root = root.rstrip("/")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: (i.size, i.mtime_ns or 0) for i in infos if i.type == pyarrow.fs.FileType.File}


def file_sizes(location: str | os.PathLike) -> dict[str, int]:
    """{path relative to `location`: size} of every file under a directory ({} if there is none)."""
    return {k: size for k, (size, _) in _listing(location).items()}


def _listing_digest(location: str, skip: tuple[str, ...]) -> str:
    """Digest of a URI and its files' names, sizes and modification times: a directory rewritten in
    place gets a new cache entry."""
    h = hashlib.blake2b(location.encode() + b"\0" + repr(skip).encode(), digest_size=12)
    for rel, (size, mtime) in sorted(_listing(location).items()):
        if rel.split("/", 1)[0] not in skip:
            h.update(f"{rel}\0{size}\0{mtime}\0".encode())
    return h.hexdigest()


def cache_dir() -> Path:
    """This user's node-local cache of URI copies (and of `rl_agents.cluster.Weights`' copies)."""
    return Path(tempfile.gettempdir()) / CACHE_DIR


def local_copy(location: str | os.PathLike, skip: tuple[str, ...] = ()) -> str:
    """A local directory with the files of `location`: the path itself when local, else a node-local
    copy (`$TMPDIR/rl_agents-weights/uri-<digest>`). The digest covers the files' names, sizes and
    times, so a rewritten directory is copied again. One process per node downloads (a file lock),
    the others wait and share its copy; it appears atomically, and is trusted only if this user owns
    it. The newest `CACHE_KEEP` copies are kept, older ones (and downloads a killed process left
    half-done) removed."""
    import fcntl

    if not is_uri(location):
        return local_path(location)
    location = str(location)
    digest = _listing_digest(location, skip)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / f"uri-{digest}"
    with open(cache / f".uri-{digest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dst.is_dir() and dst.stat().st_uid != os.getuid():
            raise PermissionError(f"{dst}: owned by another user; set TMPDIR to a directory of your own")
        if not dst.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".uri-{digest}-", dir=cache))
            try:
                download(location, tmp, skip)
                if not any(tmp.iterdir()):
                    raise FileNotFoundError(f"{location}: no such directory, or it holds no files")
                os.replace(tmp, dst)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        os.utime(dst)  # most recently used
    _evict(cache)
    return str(dst)


def follow_pointer(location: str | os.PathLike) -> str:
    """`<path>.uri` stands for `<path>` when that does not exist: a run whose policies live at a URI
    writes `run_dir/policy.uri` instead of the `run_dir/policy` link, and `runs/x/policy` then means
    the URI in it."""
    if is_uri(location):
        return str(location)
    p = Path(local_path(location))
    pointer = p.with_name(p.name + ".uri")
    if not p.exists() and pointer.is_file():
        return pointer.read_text(encoding="utf-8").strip()
    return str(location)


def _evict(cache: Path) -> None:
    """Keep the `CACHE_KEEP` most recently used URI copies; drop downloads left by killed processes
    (a day old). Another process may be loading an older copy right now: a copy is only removed
    under its own lock, never while a download of it is in progress."""
    import fcntl
    import time

    copies = sorted((d for d in cache.glob("uri-*") if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in copies[CACHE_KEEP:]:
        with open(cache / f".{d.name}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            shutil.rmtree(d, ignore_errors=True)
    for d in cache.glob(".uri-*-*"):
        if d.is_dir() and time.time() - d.stat().st_mtime > 86400:
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def as_local_dir(location: str | os.PathLike):
    """The directory `location` as a local path for the duration (a temporary copy of a URI)."""
    if not is_uri(location):
        yield Path(local_path(location))
        return
    with tempfile.TemporaryDirectory(prefix="rl_agents_dl_") as tmp:
        download(location, tmp)
        yield Path(tmp)


__all__ = ["CACHE_KEEP", "URI_SCHEMES", "as_local_dir", "cache_dir", "check_uri",
           "delete_dir", "download", "exists", "file_sizes", "filesystem", "follow_pointer", "is_file",
           "is_uri", "join", "list_dirs", "local_copy", "local_path", "name", "normalize", "probe",
           "read_text", "scheme", "upload", "upload_policy", "write_text"]
