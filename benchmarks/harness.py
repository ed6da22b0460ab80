"""What every benchmark shares: the record of where its numbers were taken, and the one writer of results.

    env = environment(device)                 # commit (+dirty), date, device, CPU threads, load, versions
    path = write_results("train", payload, markdown)
    # -> benchmarks/results/<date>-<device>-train.json (+ .md), payload["environment"] filled in

A results file is always written whole (temporary file + rename), so a benchmark may rewrite it after each
measurement and a run killed at any moment leaves the last complete version.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from minilora.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
# Recorded with every result: the libraries whose code the numbers measure (None where not installed).
PACKAGES = ("torch", "transformers", "bitsandbytes", "triton", "peft")


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
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine() or "cpu")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str) -> dict:
    """Where and on what a benchmark ran: taken once at its start and saved with its results."""
    device = torch.device(device)
    return {"commit": git_commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device.type, "device_name": device_name(device),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg": list(os.getloadavg()), "python": platform.python_version(),
            **{name: package_version(name) for name in PACKAGES}, "argv": sys.argv}


def device_slug(env: dict) -> str:
    """The device part of a results file name: "cpu", or the GPU's name in short ("h100-80gb-hbm3")."""
    if env["device"] == "cpu":
        return "cpu"
    name = env["device_name"].lower().replace("nvidia", "")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split()) or env["device"]


def write_results(name: str, payload: dict, markdown: str | None = None, out_dir: str | Path = RESULTS_DIR,
                  device_label: str | None = None) -> Path:
    """Writes `<out_dir>/<date>-<device>-<name>.json` (and `.md` with `markdown`), each atomically; returns
    the JSON path. payload["environment"] is filled in, once, where the caller has not put it there: a
    benchmark that rewrites its file after each measurement keeps the record of its start (and its date)."""
    env = payload.setdefault("environment", environment("cuda" if torch.cuda.is_available() else "cpu"))
    stem = f"{env['date'][:10]}-{device_label or device_slug(env)}-{name}"
    path = Path(out_dir) / f"{stem}.json"
    if markdown is not None:
        atomic_write_text(path.with_suffix(".md"), markdown)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def draw_masks_as_minilora(peft_model):
    """PEFT's LoRA dropout modules draw their masks by minilora's law (minilora/dropout.py: nn.Dropout's
    distribution, drawn differently on a CPU). With the same seed both models then see the same masks,
    so losses and gradients compare mask for mask. Returns the model."""
    from minilora.dropout import LoRADropout

    replaced = 0
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for key, drop in dropouts.items():
                if isinstance(drop, torch.nn.Dropout):
                    dropouts[key] = LoRADropout(drop.p)
                    replaced += 1
    if not replaced:
        raise RuntimeError("no PEFT LoRA dropout module found")
    return peft_model
