"""The install: nothing of ours runs under a third-party name, the kernels stand alone, the lock fits the
ranges, and `python -m minilora.env` tells what a bug report needs."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from train_utils import ROOT

KERNELS = ROOT / "kernels" / "minilora.kernels"
# Top-level names under which files of this checkout may run: the library, the script, and the
# benchmarks and tests run from the root.
OURS = {"minilora", "train", "benchmarks", "tests", "__main__"}
ENTRY_POINTS = [("path", "train.py"), *(("module", f"minilora.{m}") for m in ("generate", "merge", "inspect", "env")),
                *(("module", f"benchmarks.{m}") for m in ("data", "epoch", "fsdp", "inspector", "kernels", "levers",
                                                          "lora_stats_cost", "plot_throughput", "throughput"))]

# Runs every entry point's --help from the checkout's root, then what a training run imports
# (transformers' modeling code imports Hugging Face's `kernels` where it is installed), and reports
# which modules of this checkout were loaded under which names, and where `kernels` resolves.
PROBE = """
import importlib, importlib.util, json, pkgutil, runpy, sys
from pathlib import Path
root = Path.cwd().resolve()
failed = []
for kind, target in json.loads(sys.argv[1]):
    sys.argv = [target, "--help"]
    try:
        runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
    except SystemExit as done:
        if done.code not in (0, None):
            failed.append(f"{target}: exit {done.code}")
import transformers.modeling_utils, bitsandbytes, minilora.kernels
import minilora
minilora.load_base("builtin:tiny-phi3", device="cpu")

venv = Path(sys.prefix).resolve()  # a venv may live in the checkout (.venv): its packages are not ours

def inside(path):
    # Only absolute paths name a file: torch.ops and torch.classes carry a bare "_ops.py"/"_classes.py".
    parents = Path(path).resolve().parents if isinstance(path, str) and Path(path).is_absolute() else ()
    return root in parents and venv not in parents

def own_file(module):
    # From the module's own dict: a lazy module (transformers) imports on attribute lookups. Only modules
    # with a file run code; a namespace package (a folder without __init__.py, as kernels/ is) runs none.
    return getattr(module, "__dict__", {}).get("__file__")

loaded = sorted(name for name, module in list(sys.modules.items()) if inside(own_file(module)))
spec = importlib.util.find_spec("kernels")
where = None if spec is None else (spec.origin if spec.origin not in (None, "namespace") else None)
reachable = [] if spec is None or spec.submodule_search_locations is None else \\
    [m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations)) if inside(m.module_finder.path)]
print(json.dumps({"failed": failed, "loaded": loaded, "kernels_origin": where,
                  "kernels_ours": spec is not None and inside(spec.origin), "kernels_reachable": reachable}))
"""


@pytest.mark.slow
def test_nothing_of_ours_runs_under_a_third_party_name_from_the_root():
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(ENTRY_POINTS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["failed"] == []
    assert {name.split(".")[0] for name in found["loaded"]} <= OURS, found["loaded"]
    assert "minilora.kernels.fused_lora" in found["loaded"]  # the probe did load the kernels, as minilora.kernels
    # `kernels` is Hugging Face's package where installed (transformers 5.25+ pulls it), else nothing of ours:
    # the folder kernels/ holds no module that an import can reach.
    assert not found["kernels_ours"] and found["kernels_reachable"] == []
    if _installed("kernels"):
        assert "site-packages" in found["kernels_origin"], found["kernels_origin"]


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_importing_the_kernels_loads_no_other_minilora_module():
    code = ("import sys, minilora.kernels; print(sorted(m for m in sys.modules if m.startswith('minilora') "
            "and not m.startswith('minilora.kernels') and m != 'minilora'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _lock() -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)$",
                                                                (ROOT / "constraints.txt").read_text(), re.M)}


def test_the_lock_pins_every_dependency_inside_its_range():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = {re.sub(r"[-_.]+", "-", k): v for k, v in _lock().items()}
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in lock, f"constraints.txt has no pin for {name}"
        assert requirement.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} vs {text}"


def test_lowest_versions_are_the_lower_bounds_of_the_ranges():
    done = subprocess.run([sys.executable, str(ROOT / ".ci" / "versions.py"), "lowest"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pins = dict(re.match(r"([^=]+)==([^ ]+)", line).groups() for line in done.stdout.splitlines())
    assert pins["torch"] == "2.13" and pins["transformers"] == "5.17" and pins["peft"] == "0.18"


@pytest.mark.slow
def test_env_reports_the_installed_versions_and_why_the_kernels_do_not_run_on_a_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINILORA_KERNELS")}
    done = subprocess.run([sys.executable, "-m", "minilora.env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = dict(re.match(r"(\S.*?)\s{2,}(.*)$", line).groups() for line in done.stdout.splitlines())
    for name in ("torch", "transformers", "bitsandbytes", "safetensors", "tokenizers", "numpy"):
        assert rows[name] == importlib.metadata.version(name), name
    import torch
    from bitsandbytes import cextension

    assert rows["bitsandbytes backend"] == cextension.BNB_BACKEND
    assert rows["torch CUDA build"] == (torch.version.cuda or "none (CPU build)")
    assert rows["fused kernels"].startswith("no: no CUDA device")
    assert rows["data cache"].endswith(("(absent)", "files)")) and rows["python"].startswith(sys.version.split()[0])


@pytest.mark.slow
def test_env_check_runs_the_kernels_against_pytorch_in_the_interpreter():
    env = {**{k: v for k, v in os.environ.items() if k != "MINILORA_KERNELS"}, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "minilora.env", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "fused kernels" in done.stdout and "in Triton's interpreter" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "check cpu float32: ok, equal to PyTorch"


def test_readme_commands_install_the_lock():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .venv && .*$", text, re.M)
    assert len(commands) >= 2 and all("-c constraints.txt" in c for c in commands), commands
    assert Path(ROOT / "constraints.txt").is_file()
