"""Files that replace files, and one writer at a time.

Every write that replaces a file goes through `atomic_output` (or its wrappers): the bytes go
to a temporary name unique to this process in the same folder, are flushed to disk, and are
renamed over the target, so a reader (or a run killed at any point) sees the old file or the
new one, never half of one. `WriterLock` lets one process at a time write a store or an index
and tells the next one who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "LockedError",
    "WriterLock",
    "atomic_output",
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "fsync_dir",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside folder `path` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    # unique per process and call, so two writers of one target never share a temporary file
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends cleanly, the file written
    there is synced and renamed to `path`. On an error the temporary file is removed and
    `path` is left as it was. For writers that take a path (np.save, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    mode: str = "w",
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """``with atomic_output(p) as f: f.write(...)`` replaces `p` whole or not at all."""
    binary = "b" in mode
    text = {} if binary else {"encoding": encoding, "newline": newline}
    with atomic_path(path) as tmp, open(tmp, mode, **text) as f:
        yield f
        f.flush()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_output(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """Replace `path` with `obj` as JSON atomically (keyword arguments go to json.dumps)."""
    dumps.setdefault("ensure_ascii", False)
    atomic_write(path, json.dumps(obj, **dumps))


class LockedError(RuntimeError):
    """Another process holds the writer lock of a store or an index."""


class WriterLock:
    """An exclusive, non-blocking advisory lock on a file (flock), released at exit or death.

    The holder writes who it is into the file, so a refused process can name it. The lock
    file is never deleted: unlinking a held lock file would let a third process lock a new
    file of the same name while the holder still writes.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        """
        Args:
            path: the lock file (created when missing).
            what: the locked thing, for the error message ("region store runs/x").
        """
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise LockedError(
                f"{self.what} is being written by {self.holder()}; wait for it to finish or stop it"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(sys.argv)[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, as recorded in the lock file."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def is_held_elsewhere(self) -> bool:
        """True when another open file description holds the lock (checked without waiting)."""
        if self._fd is not None or not self.path.exists():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the shared lock taken for the test
        return False

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
