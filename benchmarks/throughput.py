"""How fast, how lean and how faithful is a minilora training step next to what users would run instead?

Three systems train the same base (a Phi-3 architecture with random weights, saved once and loaded by
each from disk) on the same synthetic batches with the same optimizer, learning rate, seed, dropout
masks and initial LoRA weights:

    ours      minilora itself: the recipe as a minilora.training.config.TrainConfig, the model and
              minilora.training.loop.TrainingLoop built as the training job builds them (load_base NF4 +
              double quant, add_lora, enable_recompute), and the loop's own train_step() driven step by step
    ref_loop  transformers 4-bit (BitsAndBytesConfig nf4, double quant) + prepare_model_for_kbit_training
              + PEFT LoraConfig + gradient checkpointing (use_reentrant=False), the model's own loss
              (`model(..., labels=...)`: full logits, as users run it), in a hand-written reference step
    trainer   the same reference model trained by transformers.Trainer, as users run it

Per system: training tokens/s (median over the steps after warm-up), peak memory (GPU: max allocated
and reserved; CPU: peak RSS while training), time to first step (from the start of loading to the end
of optimizer step 1) and the loss at every step. The losses must agree within a tolerance, or the
speed means nothing. On GPU also the model FLOPs utilisation (formula in throughput_setup.FLOPS_FORMULA).
For ours and ref_loop, two extra steps (after the timed ones) run under torch.profiler: where the time
goes, summed by category (GEMMs, NF4 dequant, attention, dropout, ...; benchmarks.step_profile).

Each system runs in its own process (clean peak memory; an OOM or crash costs only that system);
the parent writes <out>/<date>-<device>-train.json and .md after each one, so a timeout keeps data.
From the repository root:

    python -m benchmarks.throughput --quick                      # CPU: small Phi-3, < 5 min on 2 cores
    python -m benchmarks.throughput                              # GPU: Phi-3-mini at seq 2048 and 512
    python -m benchmarks.throughput --seqs 2048 --out DIR --budget-s 300
    python -m benchmarks.plot_throughput benchmarks/results/<date>-<device>-train.json

This module plans the runs, starts each system's process and writes the files. The rest lives beside it:
throughput_setup (the models, recipe, synthetic data and FLOP formula all systems share), throughput_systems (one
system built, trained and measured: the child process), ours (minilora built and driven as train.py does),
step_profile (the profiled steps), throughput_report (rounds merged, ratios, loss parity, goals, the report),
harness (the environment record and the results writer every benchmark uses).
"""

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .harness import RESULTS_DIR, ROOT, environment
from .throughput_report import NOTES, compare, markdown, memory_mib, merge_rounds, show, write
from .throughput_setup import (
    FLOPS_FORMULA,
    LORA,
    LR,
    MODELS,
    PHI3_MINI,
    SEED,
    SYSTEMS,
    flops_per_token,
    linear_weights,
    peak_flops,
    phi3_config,
    saved_model,
)
from .throughput_systems import child_main

# Rows per step: GPU sizes fit an H100 80 GB; 256 is the CPU quick size (one row keeps a step ~1-2 s).
BATCH_FOR_SEQ = {256: 1, 512: 16, 1024: 8, 2048: 4, 4096: 2}
QUICK_BUDGET_S = 270  # --quick must finish in 5 minutes even on a loaded machine
MIN_RUN_S = {True: 20, False: 60}  # by --quick: a system's process takes at least this (imports, loading)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized: model cpu-small, seq 256, batch 1, 8 steps (2 warm-up), 2 rounds")
    p.add_argument("--model", choices=list(MODELS), help="default: phi3-mini on GPU, cpu-small with --quick or on CPU")
    p.add_argument("--seqs", nargs="+", type=int, help="sequence lengths (default GPU 2048 512; quick 256)")
    p.add_argument("--batch", type=int, help=f"rows per step (default per seq: {BATCH_FOR_SEQ})")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 8)")
    p.add_argument("--warmup", type=int, help="steps left out of tokens/s (default 2 quick, 3 GPU)")
    p.add_argument("--rounds", type=int,
                   help="times each system runs, alternating the order (default 2 quick: a shared CPU's load "
                        "drifts; 1 GPU)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   help="ours always runs first: the references start from its initial LoRA weights")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for the results files")
    p.add_argument("--budget-s", type=float,
                   help="start no system that would end after this many seconds; results so far are kept "
                        f"(default {QUICK_BUDGET_S}s with --quick, none otherwise)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the two extra profiled steps of ours and ref_loop (where the time goes, by category)")
    p.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "minilora-bench-models"),
                   help="where the random-weight base models are saved (reused across runs)")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_spec(model_dir: Path, device: torch.device, seq: int, batch: int, steps: int, config, work: Path,
              profile: bool = False) -> dict:
    """Everything a system's process needs, JSON-serialisable."""
    return {"model_dir": str(model_dir), "device": str(device), "profile": profile,
            "precision": "bf16" if device.type == "cuda" else "fp32", "seq": seq, "batch": batch, "steps": steps,
            "lr": LR, "seed": SEED, "vocab": config.vocab_size, "pad_id": config.pad_token_id,
            "threads": torch.get_num_threads(),
            "init_dir": str(work / "init_adapter"), "work_dir": str(work)}


def new_run(model_name: str, config, spec: dict, gpu_name: str) -> dict:
    """An empty run (one model and sequence length) with its FLOP count; gpu_name is read only on CUDA."""
    cuda = spec["device"].startswith("cuda")
    return {"model": model_name, "config": {k: getattr(config, k) for k in MODELS.get(model_name, PHI3_MINI)},
            "seq": spec["seq"], "batch": spec["batch"], "device": "cuda" if cuda else "cpu",
            "precision": spec["precision"], "flops_per_token": flops_per_token(config, spec["seq"]),
            "n_linear_weights": linear_weights(config), "peak_flops": peak_flops(gpu_name) if cuda else None,
            "systems": {}, "raw": {}}


def record(run: dict, result: dict, warmup: int) -> None:
    """Adds one process's result to the run and recomputes the summary, ratios and parity."""
    system = result["system"]
    run["raw"].setdefault(system, []).append(result)
    run["systems"][system] = merge_rounds(run["raw"][system], warmup)
    compare(run)


def run_child(system: str, spec: dict, work: Path, timeout_s: float) -> dict:
    spec_path, out_path, log_path = work / "spec.json", work / f"{system}.json", work / f"{system}.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    out_path.unlink(missing_ok=True)  # never read an earlier round's result as this one's
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--child", system, "--spec", str(spec_path),
           "--child-out", str(out_path)]
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            return {"system": system, "status": f"TIMEOUT after {timeout_s:.0f}s (budget)"}
    if out_path.is_file():
        return json.loads(out_path.read_text())
    tail = log_path.read_text().strip().splitlines()[-12:]
    oom = any("OutOfMemory" in line or "out of memory" in line for line in tail)
    return {"system": system, "status": "OOM" if oom else f"failed (rc {rc})", "log_tail": tail}


def main(argv=None) -> int:
    args = parse_args(argv)
    # bitsandbytes logs a missing optional CPU-inference kernel on import; that path is switched off.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if args.child:
        return child_main(args.child, args.spec, args.child_out)
    started = time.monotonic()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    model_name = args.model or ("cpu-small" if quick else "phi3-mini")
    seqs = args.seqs or ([256] if quick else [2048, 512])
    steps = args.steps or 8
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    rounds = args.rounds or (2 if quick else 1)
    budget = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if quick else math.inf)
    if not 0 <= warmup < steps:
        raise SystemExit(f"--warmup {warmup} must be in [0, --steps {steps})")
    deadline = started + budget
    systems = ["ours"] + [s for s in args.systems if s != "ours"]

    env = environment(device)
    out = Path(args.out)
    import minilora

    precision = "bf16" if cuda else "fp32"
    settings = {"model": model_name, "seqs": seqs, "steps": steps, "warmup": warmup, "lr": LR, "seed": SEED,
                "precision": precision, "lora": LORA, "targets": list(minilora.DEFAULT_TARGETS), "quick": quick,
                "rounds": rounds, "budget_s": budget}
    results = {"environment": env, "settings": settings, "flops_formula": FLOPS_FORMULA, "notes": NOTES, "runs": []}
    print(f"{env['device_name']}: {model_name}, seqs {seqs}, {steps} steps ({warmup} warm-up), {rounds} round(s), "
          f"{precision}; load average {env['load_avg'][0]:.2f}", flush=True)
    t0 = time.monotonic()
    model_dir = saved_model(model_name, torch.bfloat16 if cuda else torch.float32, device, Path(args.model_cache))
    print(f"base model: {model_dir} ({time.monotonic() - t0:.0f}s)", flush=True)
    config = phi3_config(model_name)
    work_root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        for seq in seqs:
            work = work_root / f"seq{seq}"
            work.mkdir()
            spec = make_spec(model_dir, device, seq, args.batch or BATCH_FOR_SEQ.get(seq, max(1, 8192 // seq)),
                             steps, config, work, args.profile)
            run = new_run(model_name, config, spec, env["device_name"])
            results["runs"].append(run)
            for rnd in range(rounds):
                for system in systems if rnd % 2 == 0 else systems[::-1]:
                    # Start a system only if it can finish: as long as the longest run so far, or a minimum.
                    needed = max([r.get("wall_s", 0) for rs in run["raw"].values() for r in rs] + [MIN_RUN_S[quick]])
                    left = deadline - time.monotonic()
                    if left < needed:
                        res = {"system": system, "status": "skipped (budget)"}
                    elif system != "ours" and not (work / "init_adapter").is_dir():
                        res = {"system": system, "status": "skipped (ours failed: no initial LoRA)"}
                    else:
                        t = time.monotonic()
                        res = run_child(system, spec, work, left)
                        res.update(round=rnd + 1, wall_s=time.monotonic() - t, load_avg_after=os.getloadavg())
                    record(run, res, warmup)
                    write(results, out)
                    rate = statistics.median(res["tokens_per_step"] / s for s in res["step_s"][warmup:]) \
                        if len(res.get("step_s", [])) > warmup else None
                    print(f"seq {seq} round {rnd + 1} {system:8s} {res['status']:>4s}  {show(rate, '{:,.0f}')} tokens/s"
                          f"  mem {show(memory_mib(res), '{:,.0f}')} MiB  1st step "
                          f"{show(res.get('time_to_first_step_s'), '{:.1f}')}s  ({res.get('wall_s', 0):.0f}s)",
                          flush=True)
                    if "log_tail" in res:
                        print("   " + "\n   ".join(res["log_tail"]), flush=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    results["wall_s"] = time.monotonic() - started
    path = write(results, out)
    print(markdown(results))
    print(f"wrote {path} and {path.with_suffix('.md')} ({results['wall_s']:.0f}s)")
    counts = {k: sum(g["status"] == k for g in results["goals"]) for k in ("PASS", "FAIL", "n/a")}
    print("goals: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + "; failed: "
          + ("; ".join(g["goal"] for g in results["goals"] if g["status"] == "FAIL") or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
