"""What every benchmark records next to its numbers: the commit, the device, the library versions, the date;
and the path set-up an uninstalled checkout needs.

The benchmarks run as scripts (`python benchmarks/bench_train.py`), so `benchmarks/` is on sys.path and
they import this module by name; a script loaded by file path (the tests) puts it there itself.
"""

import datetime
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    """An uninstalled checkout: minilora from the working tree, for this process and, through PYTHONPATH,
    its children. (Not put first: the repo's kernels/ folder would shadow the `kernels` package
    bitsandbytes looks for.)"""
    if importlib.util.find_spec("minilora") is None:
        sys.path.append(str(ROOT))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))


def git_commit() -> str:
    """HEAD's sha, with "+dirty" when the working tree has changes; "unknown" without git or a repository."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty and sha != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                 if line.startswith("model name")), platform.processor() or "cpu")


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def versions(*packages: str) -> dict[str, str]:
    """{package: its __version__}, in the order given (each is imported)."""
    return {name: importlib.import_module(name).__version__ for name in packages}


def now() -> str:
    """The local date and time to the second, ISO 8601: when the results were taken."""
    return datetime.datetime.now().isoformat(timespec="seconds")
