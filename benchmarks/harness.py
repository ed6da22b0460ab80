"""What every benchmark shares: where its numbers were taken, and the one writer of results.

    env = environment(device)
    path = write_results("data", payload, markdown)   # benchmarks/results/<date>-<device>-data.json (+ .md)
"""

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from minilora.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def environment(device) -> dict:
    """Where and on what a benchmark ran: taken once at its start and saved with its results."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"commit": commit, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": str(device), "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
            "python": platform.python_version(), "argv": sys.argv}


def write_results(name: str, payload: dict, markdown: str | None = None, out_dir: str | Path = RESULTS_DIR,
                  device_label: str | None = None) -> Path:
    """Writes `<out_dir>/<date>-<device>-<name>.json` (and `.md`), each atomically; returns the JSON path."""
    env = payload.setdefault("environment", environment("cpu"))
    path = Path(out_dir) / f"{env['date'][:10]}-{device_label or env['device']}-{name}.json"
    if markdown is not None:
        atomic_write_text(path.with_suffix(".md"), markdown)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path
