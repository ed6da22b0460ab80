"""Crash-safe writes: write a temporary sibling, fsync it, then rename over the target.

A rename within one directory is atomic on POSIX, so a reader (or a resumed run after `kill -9`)
sees either the old file or the complete new one, never a half-written file. The temporary names are
created private (0600 / 0700) and given the permissions of the user's umask before they are renamed,
as a plain `open()` or `mkdir()` would have made them, so other users (a serving process) can read them.
"""

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

# A write that fails inside a library reports the system's errno in its own words: safetensors (Rust) as
# "I/O error: No space left on device (os error 28)" or "IoError(Os { code: 28, ... })", torch's writer as
# "enforce fail at inline_container.cc ... file write failed" with no errno at all.
_RUST_ERRNO = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")
_TORCH_WRITE_FAILED = ("inline_container", "write failed")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def write_error(err: BaseException, target: str | os.PathLike, partial: str | os.PathLike | None = None):
    """`err`, raised while writing `target`, as an OSError naming `target`, or None if it is not a failure
    of the write itself. A full disk also says how much had been written when it ran out (`partial`: the
    temporary file or folder) and how much is free, so the user knows what to make room for."""
    if isinstance(err, OSError):
        code = err.errno
    else:
        found = _RUST_ERRNO.search(str(err))
        code = int(found.group(1) or found.group(2)) if found else None
        if code is None and all(w in str(err) for w in _TORCH_WRITE_FAILED):
            code = errno.EIO
    if code is None:
        return None
    target = Path(target)
    reason = os.strerror(code)
    if code == errno.EIO and _free(target) < 1 << 20:
        code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)  # torch's writer said only "write failed"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        written = _size(Path(partial)) if partial is not None else 0
        reason += f": {_human(written)} written when it ran out" if written else ""
        reason += (", over this process's file size limit (ulimit -f)" if code == errno.EFBIG
                   else f", {_human(_free(target))} free there; it needs more than that")
    return OSError(code, reason, str(target))


def _free(path: Path) -> int:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return 0


@contextmanager
def writing(target: str | os.PathLike, partial: str | os.PathLike | None = None):
    """Errors of the writes inside name `target` (a plain `f.write` failing says only "No space left")."""
    try:
        yield
    except Exception as err:
        named = write_error(err, target, partial)
        if named is None:
            raise
        raise named from err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    try:  # Linux states it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _as_if_created_plainly(path: str | os.PathLike, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then atomically move it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with writing(path, tmp):
            write(tmp)
            _as_if_created_plainly(tmp, is_dir=False)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    # Strict JSON: a NaN or Infinity reaching a result file is a bug to surface, not a bare `NaN` to write.
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_replace_dir(build: Callable[[Path], None], target: str | os.PathLike) -> None:
    """Build a directory in a temporary sibling, then rename it into place.

    `build(tmp_dir)` fills the folder; only a complete folder ever appears under `target`'s name.
    An existing `target` is replaced (moved aside first, removed after the new one is in place).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with writing(target, tmp):
            build(tmp)
            _as_if_created_plainly(tmp, is_dir=True)
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
