"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    <output>/checkpoints/step-N/
        adapter_config.json, adapter_model.safetensors   the adapter at step N (PEFT-loadable)
        training_state.json, training_state.safetensors
                             optimizer, grad scaler, RNG states per rank (Python, NumPy, torch, CUDA), step,
                             data position, the held-out loss before training (state_io.py: no pickles)
        manifest.json        the run's fingerprint, a sha256 of each file above, one of itself, and the
                             format ("full"; an --fsdp run writes "fsdp-sharded", sharded_checkpoint.py)

A checkpoint is built in a temporary folder and renamed into place (minilora.atomic), so after a
`kill -9` every `step-N` folder is complete; the manifest also catches a folder damaged later.
Nothing in a checkpoint is unpickled: a folder written by an older minilora (`training_state.pt`) is
passed over, not loaded.
"""

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from minilora.adapter import save_adapter
from minilora.atomic import atomic_replace_dir
from minilora.errors import UserError
from minilora.training.state_io import JSON_NAME, StateFormatError, load_state, save_state

PICKLED_STATE_NAME = "training_state.pt"  # older minilora; never loaded
MANIFEST_NAME = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
SELF_KEY = "manifest_sha256"  # the manifest's checksum of its own other keys
FORMAT_KEY = "format"
FULL_FORMAT = "full"  # rank 0 holds and writes everything; manifests without a format are this one


def _manifest_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoints_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def save_checkpoint(output: str | Path, step: int, model, optimizer, scaler, extra: dict,
                    fingerprint: dict, keep: int) -> Path:
    """Write checkpoints/step-<step>/ atomically and keep only the newest `keep` checkpoints."""
    target = checkpoints_dir(output) / f"step-{step}"
    state = {"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), **extra}

    def build(folder: Path) -> None:
        save_adapter(model, folder, fingerprint.get("model"))
        save_state(state, folder)
        write_manifest(folder, step, fingerprint, FULL_FORMAT)

    atomic_replace_dir(build, target)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def write_manifest(folder: Path, step: int, fingerprint: dict, kind: str) -> None:
    """manifest.json over every file below `folder` (written last: its presence marks a complete folder)."""
    files = {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    body = {"step": step, FORMAT_KEY: kind, "fingerprint": fingerprint, "sha256": files}
    (folder / MANIFEST_NAME).write_text(json.dumps({**body, SELF_KEY: _manifest_digest(body)}, indent=2))


def checkpoint_format(manifest: dict) -> str:
    return manifest.get(FORMAT_KEY, FULL_FORMAT)


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete-looking `step-N` folders, oldest first (temporary `.step-N.*.tmp` folders never match)."""
    folder = checkpoints_dir(output)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_checkpoints_after(output: str | Path, step: int) -> None:
    for folder in list_checkpoints(output):
        if int(_STEP_DIR.fullmatch(folder.name).group(1)) > step:
            shutil.rmtree(folder, ignore_errors=True)


def verify_checkpoint(folder: Path) -> str | None:
    """None if the folder is intact, else what is wrong with it."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return "no manifest.json (written last)"
    if not (folder / JSON_NAME).is_file() and (folder / PICKLED_STATE_NAME).is_file():
        return (f"written by an older minilora ({PICKLED_STATE_NAME} is a pickle, which could run code when "
                "loaded: it is never loaded)")
    try:
        body = json.loads(manifest.read_text(encoding="utf-8"))
        digest = body.pop(SELF_KEY)
        files = body["sha256"]
        if not isinstance(body["fingerprint"], dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("fields of the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        return f"unreadable manifest ({type(err).__name__}: {err})"
    if digest != _manifest_digest(body):
        return "manifest.json does not match its own checksum (changed or damaged)"
    for name, digest in files.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if _sha256(folder / name) != digest:
            return f"{name} does not match its checksum (truncated or changed)"
    return None


def newest_intact_checkpoint(output: str | Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint and a note for each newer one that was passed over."""
    leftovers = sorted(checkpoints_dir(output).glob(".step-*.tmp")) if checkpoints_dir(output).is_dir() else []
    notes = [f"{p}: an unfinished checkpoint write, ignored" for p in leftovers]
    for folder in reversed(list_checkpoints(output)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder, notes
        notes.append(f"{folder}: skipped, {problem}")
    return None, notes


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def load_training_state(folder: Path) -> dict:
    try:
        return load_state(folder)
    except StateFormatError as err:
        raise UserError(f"--resume: {err}; resume from an earlier checkpoint (remove {folder}) or start afresh "
                        "with --overwrite") from None
