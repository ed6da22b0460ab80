"""`python -m benchmarks.fsdp --run`: train.py on one process, DDP and FSDP ranks over the same global batches, on
the CPU (gloo, fp32), with a random Llama model; losses, memory per rank, 4-bit base bytes per rank, tokens/s.
On a GPU machine train.py takes the GPU (NCCL, bf16): benchmarks/gpu_suite.sh runs one process beside FSDP at
world size 1 (`--ranks 1 --ddp-ranks`), where bf16 rounding leaves the losses close, not equal.

Each configuration is train.py itself under torchrun (benchmarks/fsdp_rank.py adds only the peak-memory read):

    1 process   --grad-accum A                     (A: --accum, the global micro-batches per step)
    DDP         2 ranks, --grad-accum A / 2
    FSDP        N ranks (--ranks), --grad-accum A / N, --fsdp

so every step trains the same padding-free rows (--batch-size rows per rank and micro-batch). Dropout is off,
so one process draws the same (no) masks as N ranks, and the losses agree up to fp32 summation order.

The model: load_memory's Llama (hidden 1536, MLP 4096, 12 heads / 4 KV heads, vocab 32000, untied head) with
--layers decoder layers, random bf16 weights written by load_memory.write_model, and minilora's byte-level
tokenizer (ids < 264 of the 32000 rows).
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from minilora.errors import UserError

from .harness import ROOT, environment, write_results
from .load_memory import CONFIG as LOAD_MEMORY_CONFIG
from .load_memory import layer_mib, write_model

DEMO = ROOT / "examples" / "demo.jsonl"
MIB = 2**20
LOSS_REL = 1e-5  # fp32 summation order over ranks; the FSDP tests hold the same tolerance
BASE_SHARE_GOAL = {2: 0.55, 4: 0.30}  # each rank's share of the 4-bit base: 1/N plus the unsharded code tables
LOAD_LAYERS = 3  # a load may hold this many decoder layers in full precision above the loaded (sharded) model


@dataclass(frozen=True)
class Setup:
    name: str
    ranks: int
    fsdp: bool


def setups(fsdp_ranks: list[int], ddp_ranks: list[int] = (2,)) -> list[Setup]:
    """The reference (1 process) first, then DDP on each of `ddp_ranks`, then FSDP on each of `fsdp_ranks`."""
    return [Setup("1 process", 1, False), *(Setup(f"DDP {n} ranks", n, False) for n in ddp_ranks),
            *(Setup(f"FSDP {n} ranks", n, True) for n in fsdp_ranks)]


def model_config(layers: int) -> dict:
    return {**LOAD_MEMORY_CONFIG, "num_hidden_layers": layers}


def prepare_model(folder: Path, layers: int) -> Path:
    """A random Llama of `layers` layers with minilora's byte-level tokenizer, written once into `folder`."""
    from minilora.builtin import build_tokenizer

    if not (folder / "model.safetensors.index.json").exists():
        write_model(folder, model_config(layers))
        build_tokenizer().save_pretrained(folder)
    return folder


def check_settings(args) -> None:
    """Every configuration splits the global micro-batches evenly over its ranks (checked before the model is made)."""
    for setup in setups(args.ranks, args.ddp_ranks):
        if setup.ranks < 1 or args.accum % setup.ranks:
            raise UserError(f"--accum {args.accum}: {setup.name} cannot split it evenly (give rank counts that "
                            "divide --accum)")
    for name in ("layers", "steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")


def train_command(setup: Setup, model: Path, output: Path, peaks: Path, args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={setup.ranks}",
            "-m", "benchmarks.fsdp_rank", str(peaks), str(ROOT / "train.py"),
            "--data", str(DEMO), "--model", str(model), "--output", str(output),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--grad-accum", str(args.accum // setup.ranks), "--max-steps", str(args.steps),
            "--warmup-steps", "1", "--lr", "1e-3", "--dropout", "0", "--eval-fraction", "0",
            "--eval-every", "0", "--save-every", "0", "--recompute", "none", *(["--fsdp"] if setup.fsdp else [])]


def measure(setup: Setup, model: Path, work: Path, args) -> dict:
    """Train `setup` once; its losses, tokens/s, each rank's peak memory, load peak and what it holds once loaded
    (benchmarks/fsdp_rank.py), and (where run.json has it) 4-bit bytes."""
    output, peaks = work / setup.name.replace(" ", "-"), work / (setup.name.replace(" ", "-") + "-peaks")
    peaks.mkdir(parents=True)
    # The ranks share the cores: each gets its part, so every configuration uses the same CPU.
    threads = max(1, (os.cpu_count() or 1) // setup.ranks)
    started = time.perf_counter()
    done = subprocess.run(train_command(setup, model, output, peaks, args), cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise RuntimeError(f"{setup.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    run = json.loads((output / "run.json").read_text())
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ranks = sorted((json.loads(p.read_text()) for p in peaks.glob("rank*.json")), key=lambda r: r["rank"])
    return {"name": setup.name, "ranks": setup.ranks, "fsdp": setup.fsdp, "threads_per_rank": threads,
            "losses": [m["loss"] for m in metrics if m["kind"] == "train"],
            "tokens_per_s": run["result"]["tokens_per_s"], "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mib": [round(r["peak_rss"] / MIB, 1) for r in ranks],
            "load_peak_mib": [round(r["load_peak"] / MIB, 1) for r in ranks],
            "load_held_mib": [round(r["load_held"] / MIB, 1) for r in ranks],
            "load_shard_mib": [round(r["load_shard"] / MIB, 1) for r in ranks],
            "base_bytes": run.get("base_bytes")}


def same_losses(losses: list, reference: list, rel: float = LOSS_REL) -> bool:
    if len(losses) != len(reference):
        return False
    return all(a is not None and b is not None and math.isclose(a, b, rel_tol=rel)
               for a, b in zip(losses, reference, strict=True))


def largest_base(run: dict) -> int | None:
    """The largest rank's bytes of the 4-bit base (run.json's base_bytes; None where the run did not record them)."""
    return max(run["base_bytes"]["ranks"]) if run.get("base_bytes") else None


def base_share(run: dict, reference: dict) -> float | None:
    """The largest rank's 4-bit base bytes over one process's."""
    largest, whole = largest_base(run), largest_base(reference)
    return None if largest is None or not whole else largest / whole


def load_budget(run: dict, layer_mib: float) -> list[float]:
    """Each rank's load budget: its shard of the model (the whole model in one process; under FSDP every
    parameter at its sharded size, the root's too) plus three decoder layers in fp32."""
    return [shard + LOAD_LAYERS * layer_mib for shard in run["load_shard_mib"]]


def goals(runs: list[dict], layer_mib: float) -> list[dict]:
    """The goals against the 1-process run (runs[0]): each FSDP run's equal losses at 2 ranks and base share at 2 and
    4; the load peak of every rank of the 1-process and FSDP runs within its budget."""
    reference, checks = runs[0], []
    for run in runs:
        if run["fsdp"] or run is reference:
            worst = max(peak / budget for peak, budget in zip(run["load_peak_mib"], load_budget(run, layer_mib),
                                                                strict=True))
            checks.append({"goal": f"{run['name']}: load peak <= the rank's shard of the model + {LOAD_LAYERS} "
                                   f"fp32 layers ({layer_mib:,.1f} MiB each), every rank",
                           "value": f"{worst:.2f}x the budget (largest rank)", "met": worst <= 1})
    for run in runs[1:]:
        if not run["fsdp"]:
            continue
        if run["ranks"] == 2:
            checks.append({"goal": f"{run['name']}: losses equal 1 process (rel {LOSS_REL:g}, every step)",
                           "value": "equal" if same_losses(run["losses"], reference["losses"]) else "differ",
                           "met": same_losses(run["losses"], reference["losses"])})
        if run["ranks"] in BASE_SHARE_GOAL:
            share, most = base_share(run, reference), BASE_SHARE_GOAL[run["ranks"]]
            checks.append({"goal": f"{run['name']}: each rank's 4-bit base <= {most:.2f}x 1 process",
                           "value": "not recorded" if share is None else f"{share:.3f}x",
                           "met": share is not None and share <= most})
    return checks


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value is not None and reference else "n/a"


def table(runs: list[dict], layer_mib: float) -> str:
    """Markdown: one row per configuration with its ratios against the 1-process run (runs[0]), then the load
    peaks per rank against their budgets, then the goals."""
    reference = runs[0]
    ref_peak = max(reference["peak_rss_mib"])
    ref_base = largest_base(reference)
    lines = ["| configuration | losses per step | = 1 process (rel 1e-5) | peak RSS per rank MiB | max / 1 process "
             "| 4-bit base per rank MiB | / 1 process | tokens/s | / 1 process |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        base = largest_base(run)
        lines.append(
            f"| {run['name']} | {', '.join('n/a' if x is None else f'{x:.6f}' for x in run['losses'])} | "
            f"{'yes' if same_losses(run['losses'], reference['losses']) else 'no'} | "
            f"{', '.join(f'{m:,.0f}' for m in run['peak_rss_mib'])} | {_ratio(max(run['peak_rss_mib']), ref_peak)} | "
            f"{'n/a' if base is None else f'{base / MIB:,.1f}'} | {_ratio(base, ref_base)} | "
            f"{run['tokens_per_s']:,.0f} | {_ratio(run['tokens_per_s'], reference['tokens_per_s'])} |")
    lines += ["", "| configuration | load peak per rank MiB | held once loaded MiB | its shard of the model MiB "
              "| budget MiB | peak / budget |", "|---|---|---|---|---|---|"]
    for run in runs:
        budget = load_budget(run, layer_mib)
        lines.append(f"| {run['name']} | {', '.join(f'{m:,.1f}' for m in run['load_peak_mib'])} | "
                     f"{', '.join(f'{m:,.1f}' for m in run['load_held_mib'])} | "
                     f"{', '.join(f'{m:,.1f}' for m in run['load_shard_mib'])} | "
                     f"{', '.join(f'{m:,.1f}' for m in budget)} | "
                     f"{', '.join(f'{p / b:.2f}x' for p, b in zip(run['load_peak_mib'], budget, strict=True))} |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'NO'} |" for g in goals(runs, layer_mib)]
    return "\n".join(lines)


def report(payload: dict) -> str:
    env, cfg = payload["environment"], payload["settings"]
    return "\n".join([
        f"# QLoRA on CPU ranks: 1 process vs DDP vs FSDP2 ({env['date'][:10]})", "",
        f"train.py under torchrun (gloo, fp32 compute, NF4 + double quant), a random Llama of "
        f"{payload['weights']:,} weights ({cfg['layers']} layers of hidden 1536, MLP 4096, vocab 32000), "
        f"{cfg['steps']} steps of {cfg['accum']} global micro-batches x {cfg['batch_size']} rows per rank, "
        f"--seq-len {cfg['seq_len']}, examples/demo.jsonl, dropout 0, --recompute none. Peak RSS is each rank's "
        "VmHWM from the load on (imports resident throughout); the 4-bit base is packed codes + statistics, the "
        "largest rank's share (run.json's base_bytes); tokens/s is global, steps after the first. Load peak: "
        "VmHWM during train.py's build_model above the memory at its start (benchmarks/fsdp_rank.py); held once "
        "loaded: the rank's parameters, buffers and 4-bit statistics (under FSDP the decoder layers and the "
        "embeddings are sharded while they load; the final norm and head are whole until the first step's root "
        "sharding); its shard of the model: the same with the final norm and head at their sharded size. "
        "Budget: the shard + 3 fp32 decoder layers.", "",
        table(payload["runs"], payload["layer_mib"]), "",
        f"{env['device_name']}, {env['cpu_count']} CPUs shared by the ranks, commit `{env['commit'][:12]}`, "
        f"torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, load average {env['load_avg'][0]:.2f} "
        "at the start.", ""])


def run_benchmark(args) -> Path:
    """Generate (or reuse) the model, train every configuration once, write the results; returns the JSON path."""
    from minilora.safetensors_reader import read_headers

    check_settings(args)
    import torch

    env = environment("cuda" if torch.cuda.is_available() else "cpu")  # train.py takes the GPU where there is one
    with tempfile.TemporaryDirectory() as tmp:
        model = prepare_model(Path(args.model_dir) if args.model_dir else Path(tmp) / "model", args.layers)

        weights = sum(torch.Size(s.shape).numel() for s in read_headers(sorted(model.glob("*.safetensors"))).values())
        settings = {k: getattr(args, k) for k in ("layers", "steps", "accum", "batch_size", "seq_len", "ranks",
                                                "ddp_ranks")}
        payload = {"environment": env, "settings": settings, "config": model_config(args.layers),
                   "weights": weights, "layer_mib": round(layer_mib(model), 1), "runs": []}
        for setup in setups(args.ranks, args.ddp_ranks):
            payload["runs"].append(measure(setup, model, Path(tmp) / "runs", args))
            print(json.dumps(payload["runs"][-1]))
        payload["goals"] = goals(payload["runs"], payload["layer_mib"])
        path = write_results("fsdp-run", payload, report(payload), out_dir=args.out)
    print(report(payload))
    print(f"wrote {path} (+ .md)")
    return path
