"""What every benchmark records next to its numbers, and where its results go."""

import json
import os
import platform
import re
from pathlib import Path

import torch

from benchmarks.common import device_name, git_commit, now, versions

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device) -> dict:
    """Commit, date, device, library versions, threads and (CPU) the load average at the start."""
    env = {"commit": git_commit(), "date": now(), "device": device_name(device), "python": platform.python_version(),
           "versions": versions("torch", "transformers", "bitsandbytes"), "threads": torch.get_num_threads(),
           "cpus": os.cpu_count()}
    if hasattr(os, "getloadavg"):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return env


def write_results(name: str, payload: dict, markdown: str | None = None, out_dir: Path = RESULTS,
                  device_label: str | None = None) -> Path:
    """<out_dir>/<date>-<device label>-<name>.json (and .md); returns the JSON path."""
    label = device_label or re.sub(r"[^a-z0-9]+", "-", payload.get("env", {}).get("device", "cpu").lower())[:24]
    stem = f"{now()[:10]}-{label.strip('-')}-{name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    if markdown is not None:
        (out_dir / f"{stem}.md").write_text(markdown)
    return path
