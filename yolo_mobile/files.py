"""Every file the project writes goes through here, and so does every run folder it claims.

A write goes to a temporary file in the target folder, is flushed to the disk (fsync) and then renamed onto the
real name, so a reader sees the old file or the new one, never half of one; on any failure the temporary is
removed, so a full disk is not kept full by it. Errors are ``OSError`` with the target's name and, for a full
disk, the size that was needed (``needed_bytes``); :func:`describe_os_error` turns them into one line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

MB = 2**20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes files readable by their owner only; a written file gets the mode any new file would get
FILE_MODE = 0o666 & ~_umask()


def _sync_folder(folder: Path) -> None:
    """The rename itself reaches the disk (a crash after it cannot bring the old file back)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", needed_bytes: int | None = None) -> Iterator[IO[Any]]:
    """A file object to write ``path`` through: on a clean exit the data is synced and replaces ``path``; on any
    error ``path`` is as it was and the temporary file is gone."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files ('wb' or 'w'), not {mode!r}")
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _named(e, path, needed_bytes) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):  # ours, not the caller's own reading
            raise _named(e, path, needed_bytes) from None
        raise
    _sync_folder(path.parent)


def _named(e: OSError, path: Path, needed_bytes: int | None) -> OSError:
    """``e`` naming the file the user asked for (not our temporary), with the size the write needed."""
    named = e if e.errno is None else OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    if needed_bytes is not None:
        named.needed_bytes = needed_bytes
    return named


def write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    with atomic_open(path, "wb", needed_bytes=len(data)) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_with(path: str | Path, writer: Callable[[IO[bytes]], Any]) -> Path:
    """``writer(buffer)`` fills an in-memory buffer (``torch.save``, ``fig.savefig``, ``np.save``...), which is
    then written as above: a library that writes a file itself would report a full disk in its own words
    (torch: ``basic_ios::clear: iostream error``) and leave the half-written file."""
    buffer = io.BytesIO()
    writer(buffer)
    return write_bytes(path, buffer.getbuffer())


def publish(written: Path, path: Path) -> Path:
    """A file a writer produced under a temporary name (a video encoder, which streams to disk) synced and
    renamed onto ``path``."""
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    os.replace(written, path)
    _sync_folder(path.parent)
    return path


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A temporary path beside ``output`` for a writer that must be given a path (a converter that writes a file
    or a folder): moved onto ``output`` when the block ends without an error; on an error it is removed and
    ``output`` is left as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    check_writable(output.parent)
    partial = output.with_name(f".{output.name}.partial")
    remove(partial)
    try:
        yield partial
        if partial.is_file():
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
        remove(output)
        os.replace(partial, output)
        _sync_folder(output.parent)
    except OSError as e:  # a writer's own error often names no file (Python's write(): "[Errno 28] ...")
        raise (_named(e, output, None) if e.filename in (None, str(partial)) else e) from None
    finally:
        with contextlib.suppress(OSError):  # a cleanup that fails must not hide the error that brought it here
            remove(partial)


def remove(path: Path) -> None:
    """A file or a folder, gone; nothing when it is absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- folders
def check_writable(folder: str | Path) -> Path:
    """Raise the OSError a write into ``folder`` would meet (read-only, no permission, a file in the way),
    before any work is done; the folders it would create are not made. Returns ``folder``."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
    try:  # root ignores permission bits and a read-only mount ignores them all: only a real write tells
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".yolo-mobile-write-check.")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(folder)) from None
    os.close(fd)
    os.unlink(probe)
    return folder


def claim_run_dir(project: str | Path, name: str = "exp") -> Path:
    """``project/name``, or ``name2``, ``name3``... when taken, created empty by this process alone: the
    folder is claimed by ``mkdir`` itself (no exists-then-create gap), so runs started together get one each."""
    base = Path(project)
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = base / (name if n == 1 else f"{name}{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


@contextlib.contextmanager
def run_dir(project: str | Path, name: str = "exp") -> Iterator[Path]:
    """:func:`claim_run_dir` for a command's outputs; the folder goes again when the command fails or is
    interrupted before writing anything into it."""
    path = claim_run_dir(project, name)
    try:
        yield path
    except BaseException:
        with contextlib.suppress(OSError):
            path.rmdir()  # only when empty: what was written stays
        raise


# --------------------------------------------------------------------------------------------------- errors
CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (immutable or protected file?)",
    errno.ENOTDIR: "not a folder",
    errno.EISDIR: "is a folder",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error (a failing disk or a lost network mount)",
}


def describe_os_error(e: OSError) -> str:
    """One line: the cause in words, the path, and for a full disk how much was needed and is free."""
    cause = CAUSES.get(e.errno) if e.errno is not None else None
    if cause is None:
        cause = (e.strerror or str(e) or type(e).__name__).rstrip(".")
        cause = cause[0].lower() + cause[1:] if cause else cause
    where = str(e.filename) if e.filename is not None else ""
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    text = f"{cause}: {where}" if where else cause
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = getattr(e, "needed_bytes", None)
        if needed is not None:
            text += f" needs about {max(needed / MB, 0.1):.1f} MB"
        free = _free_bytes(Path(e.filename)) if e.filename is not None else None
        if free is not None:
            text += f" ({free / MB:.1f} MB free there)"
    return text


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path``'s nearest existing folder (the run folder may be gone)."""
    for folder in path.parents:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free
    return None
