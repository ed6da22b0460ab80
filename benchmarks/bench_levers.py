"""What does each memory lever save, and what does it cost in speed? One minilora training setup, one
lever changed at a time, each in its own process (clean peak memory), the same batches and initial
weights for all.

    baseline            every decoder layer recomputed, chunked loss on target tokens, fp32 AdamW
    no_recompute        --recompute none
    selective_recompute --recompute selective (keeps the products' outputs, recomputes the rest)
    recompute_every_2   --checkpoint-every 2
    offload             --offload-activations (CUDA only)
    adamw8bit           --optim adamw8bit
    paged_adamw8bit     --optim paged_adamw8bit
    full_logits_loss    the loss as transformers computes it: full [tokens, vocab] fp32 logits

    python benchmarks/bench_levers.py --quick                 # CPU, small Phi-3, a few minutes
    python benchmarks/bench_levers.py --seq 2048 --batch 4    # GPU, Phi-3-mini with random weights

Writes <out>/<date>-<device>-levers.json and .md. The losses show which levers change the numbers
(only the 8-bit optimizers should).
"""

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "baseline": {},
    "no_recompute": {"recompute": False},
    "selective_recompute": {"mode": "selective"},
    "recompute_every_2": {"every": 2},
    "offload": {"offload": True},
    "adamw8bit": {"optim": "adamw8bit"},
    "paged_adamw8bit": {"optim": "paged_adamw8bit"},
    "full_logits_loss": {"full_logits": True},
}


def model_dir(cuda: bool, cache: Path) -> Path:
    """The training benchmark's saved random-weight base (train_setup.saved_model, reused if already built):
    Phi-3-mini (../shared/ANCHORS.md) in bf16 on GPUs, its small CPU version in fp32 otherwise."""
    from train_setup import saved_model

    if cuda:
        return saved_model("phi3-mini", torch.bfloat16, torch.device("cuda"), cache)
    return saved_model("cpu-small", torch.float32, torch.device("cpu"), cache)


def peak_mb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(name: str, folder: str, seq: int, batch: int, steps: int) -> dict:
    """One lever, measured in this process: median tokens/s after 2 warm-up steps, peak memory, losses."""
    import torch.nn.functional as F

    import minilora
    from minilora.data.batching import Batch
    from minilora.training.loss import loss_sum
    from minilora.training.offload import OffloadSaved
    from minilora.training.optim import make_optimizer
    from minilora.training.recompute import enable_recompute

    lever = VARIANTS[name]
    cuda = torch.cuda.is_available()
    if lever.get("offload") and not cuda:
        return {"variant": name, "status": "skipped (needs CUDA)"}
    device = torch.device("cuda" if cuda else "cpu")
    model = minilora.load_base(folder, device=device)
    torch.manual_seed(0)
    minilora.add_lora(model, r=8, alpha=16, dropout=0.05)
    if lever.get("recompute", True):
        enable_recompute(model, every=lever.get("every", 1), offload=OffloadSaved() if lever.get("offload") else None,
                         mode=lever.get("mode", "full"))
    params = minilora.lora_parameters(model)
    opt = make_optimizer(lever.get("optim", "adamw"), params, 2e-4, 0.0, device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (steps, batch, seq), generator=g)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded_mb = peak_mb(cuda)
    model.train()
    times, losses = [], []
    for step in range(steps):
        x = ids[step]
        b = Batch(input_ids=x, labels=x, attention_mask=torch.ones_like(x),
                  position_ids=torch.arange(seq).expand(batch, seq), n_target_tokens=batch * (seq - 1),
                  n_tokens=batch * seq, lines=((0,),) * batch)
        torch.manual_seed(100 + step)  # the same dropout masks in every variant
        start = time.perf_counter()
        with autocast:
            if lever.get("full_logits"):
                inputs = {k: v.to(device) for k, v in b.model_inputs().items() if torch.is_tensor(v)}
                logits = model(**inputs, use_cache=False).logits.float()  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1).to(device))
            else:
                loss = loss_sum(model, b) / b.n_target_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs the device: the step is done
        times.append(time.perf_counter() - start)
    timed = times[2:] or times
    return {"variant": name, "status": "ok", "tokens_per_s": batch * seq / statistics.median(timed),
            "peak_mb": peak_mb(cuda), "after_load_mb": loaded_mb, "losses": losses}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()}"


def write_report(run: dict, out: Path, quiet: bool = False) -> Path:
    base = next((r for r in run["rows"] if r["variant"] == "baseline" and r["status"] == "ok"), None)
    lines = [f"# Memory levers: {run['device']}, {run['date']}, commit {run['commit']}", "",
             f"seq {run['seq']} x batch {run['batch']}, {run['steps']} steps, LoRA r=8 (NF4 base). "
             "Peak memory: " + ("max allocated on the GPU" if run["cuda"] else "peak RSS of the process") + ".", "",
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
    stem = out / f"{run['date']}-{'gpu' if run['cuda'] else 'cpu'}-levers"
    stem.with_suffix(".json").write_text(json.dumps(run, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU sizes: seq 128, batch 2, 6 steps")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
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
    run = {"device": device_name(), "cuda": cuda, "date": datetime.date.today().isoformat(), "commit": git_commit(),
           "seq": args.seq, "batch": args.batch, "steps": args.steps, "model": folder.name, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        left = args.budget_s - (time.time() - started)
        if left <= 0:
            run["rows"].append({"variant": name, "status": "not run (budget)"})
            continue
        cmd = [sys.executable, __file__, "--child", name, "--model-dir", str(folder), "--seq", str(args.seq),
               "--batch", str(args.batch), "--steps", str(args.steps)]
        try:
            # A hard deadline at the end of the budget, so that a caller's timeout a little beyond
            # --budget-s never cuts the run before its report is written.
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=left if left != float("inf") else None)
        except subprocess.TimeoutExpired:
            run["rows"].append({"variant": name, "status": "TIMEOUT (budget)"})
        else:
            if done.returncode == 0:
                run["rows"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                oom = "OutOfMemoryError" in done.stderr
                run["rows"].append({"variant": name, "status": "OOM" if oom else f"failed (rc {done.returncode})",
                                    "stderr_tail": done.stderr[-2000:]})
        print(f"{name}: {run['rows'][-1]['status']}", flush=True)
        write_report(run, out, quiet=True)  # after each variant: a timeout of the whole run keeps the rest
    write_report(run, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
