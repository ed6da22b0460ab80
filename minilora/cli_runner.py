"""Every command line's last line of defence: each failure becomes one line on stderr and an exit code.

    2  bad input (UserError: a flag, a file, a folder, a model that cannot be used as asked)
    3  out of memory, on any device (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, MemoryError)
    1  anything else; an unexpected error also leaves its traceback in a crash log, whose path is printed
  130  a second Ctrl-C (the first one stops training cleanly)

train.py, `python -m minilora.generate` and `python -m minilora.merge` all run through `run_cli`.
No torch at import: `train.py --help` passes through here.
"""

import errno
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from minilora.errors import UserError

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY, EXIT_INTERRUPTED = 1, 2, 3, 130
# Where an unexpected error goes: the README section says what to send and where.
REPORT_TO = "README.md, 'Reporting a bug'"
# What allocators say when they run out: torch's CPU allocator, CUDA, and the HIP/MPS equivalents.
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")
# Errors of the machine rather than of the program: the message is all the user needs.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _OOM_WORDS)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_crash_log(err: BaseException) -> str:
    """The command, the traceback and the environment (`python -m minilora.env`), in a file of its own;
    returns its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fd, path = tempfile.mkstemp(prefix=f"minilora-crash-{stamp}-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(" ".join(sys.argv) + "\n\n")
        f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        f.write("\n" + environment_report() + "\n")
    return path


def environment_report() -> str:
    try:
        from minilora.env import format_report, report

        return format_report(report())
    except Exception as failed:  # the log must still be written when the environment is what broke
        return f"environment: unavailable ({type(failed).__name__}: {first_line(failed)})"


def describe(err: BaseException) -> tuple[str, int]:
    """(the one line to print, the exit code) for an exception that ended a command."""
    if isinstance(err, UserError):
        return f"error: {err}", EXIT_BAD_INPUT
    if is_out_of_memory(err):
        return (f"error: out of memory: {first_line(err)}. Lower the memory needed (for training: a smaller "
                "--batch-size with a larger --grad-accum, or a shorter --seq-len)"), EXIT_OUT_OF_MEMORY
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        return f"error: {where}{err.strerror}", EXIT_FAILED
    return (f"error: unexpected {type(err).__name__}: {first_line(err)} (details in {write_crash_log(err)}; "
            f"please report it with that file: {REPORT_TO})"), EXIT_FAILED


def run_cli(entry: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run `entry(argv)` and return its exit code; every failure is one line on stderr."""
    try:
        return entry(argv) or 0
    except KeyboardInterrupt:
        print("\ninterrupted: quit at once; checkpoints already written are intact (--resume continues from "
              "the newest)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit:
        raise  # argparse's --help and usage errors
    except Exception as err:  # the one place every failure ends
        line, code = describe(err)
        print(line, file=sys.stderr)
        return code
