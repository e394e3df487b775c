"""Files written atomically, with the user's permissions, never through a link, under a lock.

Shared by every layer that writes (run folders, reports, prepared data); it
depends on nothing else in the package. A killed process leaves either the
old file or the new one, never a torn one; a write that fails (a full disk)
leaves the old file and says which path failed, in one line.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import MMBalanceError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(handle)`` into a temporary file beside ``path``, then rename it over ``path``.

    The rename replaces a symbolic link at ``path`` itself, never the file it
    points to. The file gets the permissions any new file would (0666 less
    the umask), not the temporary file's private 0600.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise MMBalanceError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise MMBalanceError(f"cannot write {path}: {exc.strerror or exc}; the previous version of it is intact") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class FolderLock:
    """An exclusive OS lock on a folder (``.lock`` inside it), held while a process writes there.

    The OS releases it when the process dies, so a stale lock of a killed
    process never blocks anyone: the next process simply takes it. The file
    holds the owner's process id for the messages and is removed on release;
    a process that locked a file someone removed meanwhile tries again, so
    two processes never both hold the folder.
    """

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self.handle = None

    def _open(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666 & ~_umask())
        except OSError as exc:
            raise MMBalanceError(f"cannot lock {self.path.parent}: {exc.strerror or exc}") from None
        return os.fdopen(fd, "r+")

    def _still_ours(self, handle) -> bool:
        try:
            return os.fstat(handle.fileno()).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return False

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            handle = self._open()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    handle.close()
                    raise
                owner = handle.read().strip() or "another process"
                if not wait:
                    handle.close()
                    raise MMBalanceError(
                        f"{self.path.parent} is in use by process {owner}; wait for it to finish or use another folder"
                    ) from None
                if on_wait and not told:
                    on_wait(f"{self.path.parent} is in use by process {owner}; waiting for it")
                    told = True
                fcntl.flock(handle, fcntl.LOCK_EX)
            if self._still_ours(handle):
                break
            handle.close()  # the holder removed the file as it released it: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if self.handle is None else self

    def __exit__(self, *exc) -> None:
        self.release()
