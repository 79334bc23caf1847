"""The run directory on disk: held by one process, every file written whole or not at all.

- :func:`atomic_write` writes a file under a temporary name beside it,
  flushes it to the disk (``fsync``), renames it into place and flushes the
  directory, so that after a crash, a ``kill -9`` or a full disk the path
  holds either the old file or the new one, never a mix or nothing.
- :class:`RunLock` holds an OS lock (``flock``) on ``RUN_DIR/.lock`` for as
  long as the process lives: the kernel drops it when the process dies,
  however it dies, and a second process asking for it is told the holder's
  pid.
- :func:`os_error_line` turns an ``OSError`` into the one line the command
  line programs print.
"""

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from typing import IO

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """A run directory cannot be used: one line naming the problem and what to do."""


def fsync_dir(path: str) -> None:
    """Flushes a directory's entries (new names, renames) to the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory; the rename still holds
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flushes every file under ``path`` and every directory in it, ``path`` included."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> str:
    """Writes ``path`` whole or not at all; returns ``path``.

    ``write(file)`` fills a temporary file in the same directory; the file is
    then flushed, renamed over ``path`` and the directory flushed. If
    anything fails (a full disk included) the temporary file is removed and
    ``path`` keeps what it held.
    """

    def fill(tmp: str) -> None:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)

    return atomic_write_path(path, fill)


def _name_path(e: BaseException, path: str) -> None:
    """For an OSError that names no file (a failed write): raises it again naming ``path``."""
    if isinstance(e, OSError) and not e.filename:
        raise OSError(e.errno, e.strerror or str(e), path) from None


def atomic_write_path(path: str, write: Callable[[str], None]) -> str:
    """As :func:`atomic_write`, for writers that take a file name (``write(tmp_path)``).

    The temporary name keeps ``path``'s extension, for writers that check it.
    """
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.tmp-", suffix=ext)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        _name_path(e, path)
        raise
    fsync_dir(folder)
    return path


def os_error_line(e: OSError, doing: str = "") -> str:
    """``"cannot write X: No space left on device"``-style text for an OSError."""
    reason = e.strerror or str(e) or type(e).__name__
    head = " ".join(str(part) for part in (doing, e.filename) if part)
    head = f"{head}: " if head else ""
    hint = {
        errno.ENOSPC: " (free space on that disk or choose another --run-dir)",
        errno.EDQUOT: " (free space on that disk or choose another --run-dir)",
        errno.EROFS: " (choose a --run-dir on a writable file system)",
        errno.EACCES: " (choose a --run-dir you may write to)",
        errno.EPERM: " (choose a --run-dir you may write to)",
    }.get(e.errno, "")
    return f"{head}{reason}{hint}"


def make_run_dir(path: str) -> None:
    """Creates ``path`` (and its parents) for a run, or raises a one-line :class:`RunDirError`."""
    if path == "":
        raise RunDirError("--run-dir must not be empty: give a directory path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"run directory {path} is a file: choose another --run-dir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise RunDirError(
                f"cannot create run directory {path}: a part of the path is a file"
            ) from None
        raise RunDirError(f"cannot create run directory {os_error_line(e)}") from None


def visible_entries(path: str) -> list[str]:
    """The names in a run directory, the lock file left out."""
    return sorted(n for n in os.listdir(path) if n != LOCK_FILE)


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or the process ends.

    Taken with ``flock(LOCK_EX | LOCK_NB)`` on ``RUN_DIR/.lock``, which then
    holds the holder's pid. The lock belongs to the open file: the kernel
    releases it when the process exits or is killed, so a dead run never
    leaves its directory locked.

    Raises:
      RunDirError: the directory is held by another process (its pid named),
        or the lock file cannot be created (not writable, read-only file
        system, ...).
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot use run directory {run_dir}: {os_error_line(e)}") from None
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read_holder()
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"process {holder}" if holder else "another process"
                raise RunDirError(
                    f"run directory {run_dir} is in use by {who}: wait for it to end "
                    f"or choose another --run-dir"
                ) from None
            raise RunDirError(f"cannot lock run directory {run_dir}: {os_error_line(e)}") from None
        try:  # a full disk may refuse even these few bytes; the lock holds without them
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass

    def _read_holder(self) -> str:
        try:
            text = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            return ""
        return text if text.isdigit() else ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
