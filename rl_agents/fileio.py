"""Atomic file and directory writes that respect the umask.

Run directories are meant to live on shared storage and to be read by rollout actors that may
run under another uid, so what we write gets the modes a plain `open()`/`mkdir()` would give
(`0o666`/`0o777` minus the umask), not `mkstemp`/`mkdtemp`'s owner-only 0600/0700.

A write either completes or leaves the old content: a file through a temporary sibling and
`os.replace`, a directory (a policy checkpoint) through `replace_dir`, which moves the old one
aside *after* the new one is complete and deletes it only once the new one is in place.
A failed write names the path and the cause (`WriteError`, an `OSError`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


class WriteError(OSError):
    """Writing `path` failed (disk full, read-only, no permission): the message names both."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ...: 'path'"
        return self.strerror or super().__str__()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def describe_os_error(e: OSError) -> str:
    """'No space left on device' and friends, with a hint where one helps."""
    hint = {errno.ENOSPC: " (the disk is full: free space or point run_dir elsewhere)",
            errno.EROFS: " (read-only file system: point run_dir at a writable directory)",
            errno.EACCES: " (permission denied: point run_dir at a directory you can write)",
            errno.EDQUOT: " (disk quota exceeded)"}.get(e.errno, "")
    return f"{e.strerror or e}{hint}"


def write_error(path: str | os.PathLike, e: OSError) -> WriteError:
    err = WriteError(e.errno, f"cannot write {path}: {describe_os_error(e)}")
    err.filename = str(path)
    return err


def read_utf8(path: str | os.PathLike, error: type[Exception], kind: str = "file") -> str:
    """A text file's content (a UTF-8 byte-order mark dropped, newlines made `\\n`); a missing,
    unreadable or non-UTF-8 file raises `error` naming the path (and the line and column of the
    first bad byte): `{path}: no such {kind}`, `{path}:3: not valid UTF-8 (byte 0xe9 at column 17)`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {kind}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {kind}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {kind} ({e.strerror or e})") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some Windows tools write one)
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        col = len(data[start:e.start].decode("utf-8")) + 1
        raise error(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old or the whole new content, never a part."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        if isinstance(e, WriteError):
            raise
        raise write_error(path, e) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _unlink_quietly(tmp) -> None:
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def make_tmp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh hidden directory `parent/.name.<random>` with the umask's mode, to build `name` in."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
        tmp.chmod(dir_mode())
    except OSError as e:
        raise write_error(parent / name, e) from None
    return tmp


def fix_modes(root: str | os.PathLike) -> None:
    """Give every file and directory under `root` (itself included) the umask's modes."""
    fm, dm = file_mode(), dir_mode()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dm)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fm)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the complete directory `tmp` to `out`, replacing any old `out`: the old one is moved
    aside first and deleted only after the new one is in place, so a failure at any point leaves
    either the old or the new directory at `out` (and removes `tmp`)."""
    tmp, out = Path(tmp), Path(out)
    old = None
    try:
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / "dir")
        os.replace(tmp, out)
    except OSError as e:
        if old is not None and (old / "dir").exists() and not out.exists():
            os.replace(old / "dir", out)  # put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, e) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
