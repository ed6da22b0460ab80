"""What does each memory lever save, and what does it cost in speed? minilora's own training step
(minilora.training.loop.TrainingLoop.train_step, model and loop built as train.py builds them) with one
lever changed at a time, each in its own process (clean peak memory), the same batches and initial weights
for all.

    baseline            every decoder layer recomputed keeping only its input (--recompute full), chunked loss
                        on target tokens, fp32 AdamW, padded (B, T) batches of full-length examples
    selective_recompute --recompute selective (what --recompute auto picks on a GPU: keeps the products'
                        outputs, recomputes the element-wise rest)
    no_recompute        --recompute none
    recompute_every_2   --recompute-every 2
    offload             --offload-activations (CUDA only)
    adamw8bit           --optim adamw8bit
    paged_adamw8bit     --optim paged_adamw8bit
    full_logits_loss    the loop's loss swapped for the loss as transformers computes it: full [tokens, vocab]
                        fp32 logits (what the chunked loss saves)

From the repository root:

    python -m benchmarks.levers --quick                 # CPU, small Phi-3, a few minutes
    python -m benchmarks.levers --seq 2048 --batch 4    # GPU, Phi-3-mini with random weights

Writes <out>/<date>-<device>-levers.json and .md. The losses show which levers change the numbers
(only the 8-bit optimizers should).
"""

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from .harness import RESULTS_DIR, ROOT, environment, write_results
from .throughput_setup import LORA, examples_from_tokens, saved_model

# Each lever as the TrainConfig fields train.py's flags set; full_logits_loss changes the loss module instead.
VARIANTS = {
    "baseline": {},
    "selective_recompute": {"recompute": "selective"},
    "no_recompute": {"recompute": "none"},
    "recompute_every_2": {"recompute_every": 2},
    "offload": {"offload_activations": True},
    "adamw8bit": {"optim": "adamw8bit"},
    "paged_adamw8bit": {"optim": "paged_adamw8bit"},
    "full_logits_loss": {},
}
LR, SEED, DATA_SEED, DROPOUT_SEED, WARMUP_STEPS = 2e-4, 0, 1, 100, 2


def model_dir(cuda: bool, cache: Path) -> Path:
    """The training benchmark's saved random-weight base (throughput_setup.saved_model, reused if already built):
    Phi-3-mini in bf16 on GPUs, its small CPU version in fp32 otherwise."""
    if cuda:
        return saved_model("phi3-mini", torch.bfloat16, torch.device("cuda"), cache)
    return saved_model("cpu-small", torch.float32, torch.device("cpu"), cache)


class FullLogitsLoss(torch.nn.Module):
    """The summed loss as transformers computes it: the full (B, T, V) logits in fp32, then cross-entropy
    (a stand-in for the loop's loss module, same interface: forward(batch) -> summed loss)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        device = self.model.get_input_embeddings().weight.device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.model_inputs().items()}
        logits = self.model(**inputs).logits.float()  # (B, T, V)
        labels = batch.labels.to(device)[:, 1:]  # (B, T-1); IGNORE_INDEX (-100) is cross_entropy's default
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 reduction="sum")


def run_variant(name: str, folder: str, seq: int, batch: int, steps: int) -> dict:
    """One lever, measured in this process: median tokens/s after the warm-up steps, peak memory (the
    loop's own figure), losses."""
    from minilora.training.config import TrainConfig
    from minilora.training.loop import peak_memory_mb

    from .ours import build_loop, build_model

    lever = VARIANTS[name]
    cuda = torch.cuda.is_available()
    if lever.get("offload_activations") and not cuda:
        return {"variant": name, "status": "skipped (needs CUDA)"}
    device, precision = (torch.device("cuda"), "bf16") if cuda else (torch.device("cpu"), "fp32")
    work = tempfile.mkdtemp(prefix="bench-levers-")
    cfg = replace(TrainConfig(model=folder, output=work, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                              batch_size=batch, grad_accum=1, max_steps=steps, lr=LR, warmup_steps=0,
                              min_lr_ratio=1.0, seq_len=seq, packing=False, padding=True, recompute="full",
                              eval_fraction=0.0, eval_every=0, save_every=0, seed=SEED, precision=precision), **lever)
    try:
        model = build_model(cfg, device, precision)
        g = torch.Generator().manual_seed(DATA_SEED)
        tokens = torch.randint(1, model.config.vocab_size, (steps * batch, seq), generator=g)
        loop = build_loop(model, cfg, examples_from_tokens(tokens), device, precision, model.config.pad_token_id)
        if name == "full_logits_loss":
            loop.loss_module = FullLogitsLoss(model)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loaded_mb = peak_memory_mb(device)
        times, losses, record = [], [], {}
        for step in range(steps):
            torch.manual_seed(DROPOUT_SEED + step)  # the same dropout masks in every variant
            start = time.perf_counter()
            record = loop.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(math.nan if record["loss"] is None else record["loss"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = times[WARMUP_STEPS:] or times
    return {"variant": name, "status": "ok", "tokens_per_s": batch * seq / statistics.median(timed),
            "peak_mb": record.get("peak_mem_mb"), "after_load_mb": loaded_mb, "losses": losses}


def markdown(run: dict) -> str:
    env, s = run["environment"], run["settings"]
    base = next((r for r in run["rows"] if r["variant"] == "baseline" and r["status"] == "ok"), None)
    lines = [f"# Memory levers: {env['device_name']}, {env['date']}, commit {env['commit']}", "",
             f"seq {s['seq']} x batch {s['batch']}, {s['steps']} steps, LoRA r={LORA['r']} (NF4 base), "
             "minilora.training.loop.TrainingLoop.train_step. Peak memory: "
             + ("max allocated on the GPU" if env["device"] == "cuda" else "peak RSS of the process") + ".", "",
             "| lever | tokens/s | vs baseline | peak MiB | vs baseline | loss step 1 -> last |",
             "|---|---:|---:|---:|---:|---|"]
    for r in run["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | | | |")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        mem = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else ""
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {speed} | {r['peak_mb']:,.0f} | {mem} | "
                     f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")
    return "\n".join(lines) + "\n"


def run_child(name: str, folder: Path, args, left: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.levers", "--child", name, "--model-dir", str(folder),
           "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps)]
    try:
        # A hard deadline at the end of the budget, so that a caller's timeout a little beyond
        # --budget-s never cuts the run before its report is written.
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              timeout=left if left != float("inf") else None)
    except subprocess.TimeoutExpired:
        return {"variant": name, "status": "TIMEOUT (budget)"}
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    oom = "OutOfMemoryError" in done.stderr
    return {"variant": name, "status": "OOM" if oom else f"failed (rc {done.returncode})",
            "stderr_tail": done.stderr[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU sizes: seq 128, batch 2, 6 steps")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no variant after this many seconds")
    p.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "minilora-bench-models"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.batch, args.steps = 128, 2, 6
    if args.child:
        print(json.dumps(run_variant(args.child, args.model_dir, args.seq, args.batch, args.steps)))
        return 0
    started, cuda = time.time(), torch.cuda.is_available()
    cache = Path(args.model_cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = model_dir(cuda, cache)
    run = {"environment": environment("cuda" if cuda else "cpu"),
           "settings": {"seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup_steps": WARMUP_STEPS,
                        "lr": LR, "model": folder.name, "code_path": "minilora.training.loop.TrainingLoop.train_step"},
           "rows": []}
    for name in args.variants:
        left = args.budget_s - (time.time() - started)
        run["rows"].append(run_child(name, folder, args, left) if left > 0
                           else {"variant": name, "status": "not run (budget)"})
        print(f"{name}: {run['rows'][-1]['status']}", flush=True)
        path = write_results("levers", run, markdown(run), out_dir=args.out)  # after each: a timeout keeps the rest
    print(markdown(run))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
