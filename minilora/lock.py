"""An exclusive lock on an output folder for the whole of a run: a second run into the same folder is
refused with one line naming the holder, instead of the two interleaving their files.

The lock is `flock` on a small file that also records who holds it (pid, host, start, command). The
kernel releases a `flock` when its process dies, however it dies, so a lock file left by a `kill -9`
is stale by construction: the next run takes it over. The file is removed on release; a run that
opened it just before that re-checks that it locked the file still in place.
"""

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from minilora.errors import UserError

LOCK_NAME = ".minilora.lock"


def _holder_line(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a run that is just starting"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class FolderLock:
    """`with FolderLock(lock_file, "--output out"):` holds `lock_file` exclusively; `label` names the
    guarded folder in messages. A folder created only to hold the lock is removed again if the run
    left nothing else in it."""

    def __init__(self, lock_file: str | os.PathLike, label: str, wait: bool = False):
        """`wait`: block until the holder releases the lock (for turns at a shared resource) instead of
        refusing at once (for a folder that one run owns)."""
        self.path, self.label, self.wait = Path(lock_file), label, wait
        self._fd: int | None = None
        self._created_folder = False

    def __enter__(self) -> "FolderLock":
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{self.label}: exists and is not a folder")
        try:
            self._created_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            self._fd = self._take()
        except OSError as err:
            raise UserError(f"{self.label}: cannot write there ({err.strerror or err})") from err
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode("utf-8"), 0)
        return self

    def _take(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_line(fd)
                os.close(fd)
                raise UserError(f"{self.label} is in use by another run ({holder}); wait for it to end or "
                                "choose another folder") from None
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # the holder removed this file as we opened it: take the new one

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # releases the flock
            self._fd = None
            if self._created_folder:
                try:
                    self.path.parent.rmdir()  # only if the run wrote nothing
                except OSError:
                    pass
        return False
