"""How fast is one LoRA layer over a 4-bit weight with our kernels, and where should dispatch switch?

For each Phi-3-mini LoRA target shape and M (rows = batch x tokens), forward and forward+backward:
    ours    minilora.kernels.lora_linear_4bit (NF4 dequant fused into the GEMMs, LoRA in the epilogue)
    bnb     bitsandbytes Linear4bit + a separate LoRA branch, the way PEFT runs it (no autocast:
            x cast to fp32, lora_B(lora_A(x)) * scale, cast back, added)
    floor   bf16 F.linear on an already-dequantized weight + the same separate LoRA: the cost
            without quantization, which ours should match at large M
First (cheap, and a goal of its own) the NF4 dequant alone against bitsandbytes' CUDA kernel, at a
few launch sizes. Then, in priority order while --budget-s lasts: the time of each dispatch branch
per M (forward and dX) to set KernelConfig's small_m_max / large_m_min from, and a small tile sweep of the split-K
kernel at M <= 16.

Times are CUDA-event medians with p20/p80 (triton.testing.do_bench, L2 flushed before each run), in
ms. Writes <out>/<date>-<gpu>-kernels.json (rows, settings, environment) and .md (ratio tables, goal
checks, crossovers), rewritten after each shape so a timeout still leaves data. From the repository root:

    python -m benchmarks.kernels --out benchmarks/results/gpu-DATE [--quick] [--budget-s 200]
"""

import argparse
import datetime
import sys
import time
from functools import partial
from pathlib import Path

import torch

from minilora.dropout import LoRADropout

from .harness import RESULTS_DIR, environment, write_results

# (N out, K in) of the four Phi-3-mini linears LoRA targets (hidden 3072, intermediate 8192, 32 heads of 96:
# https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json).
PHI3 = {"qkv_proj": (9216, 3072), "o_proj": (3072, 3072), "gate_up_proj": (16384, 3072),
        "down_proj": (3072, 8192)}
MS = [1, 16, 64, 256, 1024, 4096, 8192]
QUICK_MS = [1, 16, 256, 4096]
QUICK_SHAPES = ["qkv_proj", "down_proj"]
RANK, SCALE = 8, 2.0  # r=8, alpha=16: minilora's default recipe
DEVICE, DTYPE = "cuda", torch.bfloat16
# Goals (from the project brief): small M is where fusing the dequant pays; large M must not lose
# to cuBLAS on a plain bf16 weight.
GOAL_SMALL_M, GOAL_SMALL_SPEEDUP = 16, 2.5
GOAL_LARGE_M = 4096
SPLITK_SWEEP = [(16, 32, 64), (16, 64, 64), (16, 64, 128), (16, 128, 64), (16, 32, 128)]  # (bm, bn, bk)
# NF4 dequant alone: (elements per program, warps); the first is what dequantize_packed launches.
DEQUANT_SWEEP = [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/gpu-<date>)")
    p.add_argument("--quick", action="store_true",
                   help=f"shapes {QUICK_SHAPES}, M in {QUICK_MS}, shorter timing runs")
    p.add_argument("--shapes", nargs="+", choices=list(PHI3), help="layer shapes to run (default all)")
    p.add_argument("--ms", nargs="+", type=int, help=f"values of M (default {MS})")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout for all three (default 0)")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="stop starting new measurements after this many seconds (results are kept)")
    p.add_argument("--no-sweeps", action="store_true", help="only ours/bnb/floor, no branch or tile sweeps")
    return p.parse_args(argv)


class Bench:
    """Timing with a deadline; rows accumulate in self.rows."""

    def __init__(self, args):
        import triton.testing

        self.do_bench = triton.testing.do_bench
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.rep = 40 if args.quick else 100
        self.rows = []
        self.out_of_time = False

    def time_left(self) -> bool:
        if time.monotonic() > self.deadline:
            self.out_of_time = True
        return not self.out_of_time

    def measure(self, fn, grad_to_none=None) -> dict:
        med, p20, p80 = self.do_bench(fn, warmup=10, rep=self.rep, grad_to_none=grad_to_none,
                                      quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "p20_ms": p20, "p80_ms": p80}


def fwd_bwd(fn, x, dy):
    fn(x).backward(dy)


def make_layer(name):
    """(bnb Linear4bit with an NF4 double-quant weight, the same weight dequantized to bf16)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    n, k = PHI3[name]
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                             quant_type="nf4", device="meta")
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                    module=base).to(DEVICE)
    del w
    w_bf16 = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).to(DTYPE)
    return base, w_bf16


def dequant(bench: Bench, K, name: str, layer, ms: list[int]) -> None:
    """NF4 dequant alone, to bf16: bitsandbytes' CUDA kernel vs ours at a few launch sizes."""
    import bitsandbytes.functional as bnbf

    n, k = PHI3[name]
    base, _ = layer
    packed, state = base.weight.data, base.weight.quant_state
    pk = K.nf4.pack_state(packed, state)
    exact = torch.equal(K.nf4.dequantize_packed(pk, DTYPE), bnbf.dequantize_4bit(packed, state))
    if not exact:
        print(f"WARNING {name}: our dequant differs from bitsandbytes'")
    # Bytes moved: the packed codes and double-quantized absmax read, bf16 written.
    moved = n * k // 2 + pk.absmax.numel() * pk.absmax.element_size() + n * k * 2
    candidates = [("bnb", partial(bnbf.dequantize_4bit, packed, state))] + [
        ("ours" if i == 0 else f"ours-block{blk}-warps{w}", partial(K.nf4.dequantize_packed, pk, DTYPE, blk, w))
        for i, (blk, w) in enumerate(DEQUANT_SWEEP)]
    for impl, fn in candidates:
        if not bench.time_left():
            return
        t = bench.measure(fn)
        bench.rows.append({"kind": "dequant", "shape": name, "n": n, "k": k, "m": 0, "impl": impl,
                           "mode": "dequant", **t, "gb_per_s": moved / (t["ms"] * 1e-3) / 1e9,
                           "bit_exact_vs_bnb": exact})


def compare(bench: Bench, K, name: str, layer, ms: list[int]) -> None:
    """ours vs bnb + LoRA vs the bf16 floor, forward and forward+backward, at each M."""
    import torch.nn.functional as F

    n, k = PHI3[name]
    base, w_bf16 = layer
    p = bench.args.dropout
    g = torch.Generator(device=DEVICE).manual_seed(1)
    a = (torch.randn(RANK, k, device=DEVICE, generator=g) * 0.02).requires_grad_()
    b = (torch.randn(n, RANK, device=DEVICE, generator=g) * 0.02).requires_grad_()

    def peft_lora(x):  # PEFT's Linear4bit.forward without autocast
        return (F.linear(F.linear(F.dropout(x.float(), p, True), a), b) * SCALE).to(x.dtype)

    dropout = LoRADropout(p) if p > 0 else None  # what a LoRA layer in training hands the kernels
    impls = {
        "ours": lambda x: K.lora_linear_4bit(x, base.weight, None, a, b, SCALE, dropout),
        "bnb": lambda x: base(x) + peft_lora(x),
        "floor": lambda x: F.linear(x, w_bf16) + peft_lora(x),
    }
    for m in ms:
        if not bench.time_left():
            return
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_()
        dy = torch.randn(m, n, device=DEVICE, dtype=DTYPE, generator=g)
        with torch.no_grad():  # a cheap guard against timing a broken kernel
            torch.manual_seed(0)
            y_ours = impls["ours"](x)
            torch.manual_seed(0)
            y_bnb = impls["bnb"](x)
            err = ((y_ours.float() - y_bnb.float()).abs().max() / y_bnb.float().abs().max()).item()
        del y_ours, y_bnb
        if err > 2e-2:
            print(f"WARNING {name} M={m}: ours differs from bnb + LoRA by {err:.2e} (relative max)")
        for impl, fn in impls.items():
            with torch.no_grad():  # x without grad: bnb takes its inference (gemv) path at M=1
                fwd = bench.measure(partial(fn, x.detach()))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            fwd_bwd(fn, x, dy)
            torch.cuda.synchronize()
            peak_mib = (torch.cuda.max_memory_allocated() - start) / 2**20
            fb = bench.measure(partial(fwd_bwd, fn, x, dy), grad_to_none=[x, a, b])
            for mode, t in (("fwd", fwd), ("fwd+bwd", fb)):
                bench.rows.append({"kind": "compare", "shape": name, "n": n, "k": k, "m": m, "impl": impl,
                                   "mode": mode, **t, "rel_err_vs_bnb": err,
                                   "peak_mib": peak_mib if mode == "fwd+bwd" else None})
        print(f"{name:13s} M={m:5d} " + "  ".join(
            f"{r['impl']} {r['mode']} {r['ms'] * 1e3:8.1f}us" for r in bench.rows[-6:]), flush=True)


def packed_layer(K, name: str, layer, seed: int) -> tuple:
    """(n, k, the layer's NF4 weight packed for the kernels, a generator seeded `seed`) of a Phi-3 shape."""
    n, k = PHI3[name]
    base, _ = layer
    pk = K.nf4.pack_state(base.weight.data, base.weight.quant_state)
    return n, k, pk, torch.Generator(device=DEVICE).manual_seed(seed)


def branches(bench: Bench, K, name: str, layer, ms: list[int]) -> None:
    """Each dispatch branch's forward (Y) and dX GEMMs alone, same inputs: the crossovers."""
    fused = K.fused_lora
    n, k, pk, g = packed_layer(K, name, layer, seed=2)
    a = torch.randn(RANK, k, device=DEVICE, generator=g) * 0.02
    b = torch.randn(n, RANK, device=DEVICE, generator=g) * 0.02
    for m in ms:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, generator=g)
        dy = torch.randn(m, n, device=DEVICE, dtype=DTYPE, generator=g)
        s = x @ a.to(DTYPE).t()  # (M, r)
        gm = dy @ (b * SCALE).to(DTYPE)  # (M, r)
        for branch in ("splitk", "tiled", "dequant"):
            if branch == "splitk" and m > 1024:
                continue
            if not bench.time_left():
                return
            with torch.no_grad():
                fwd = bench.measure(partial(fused.base_lora_forward, x, pk, s, b, SCALE, None, branch))
                dx = bench.measure(partial(fused.base_lora_dx, dy, pk, gm, a, branch))
            for mode, t in (("fwd", fwd), ("dx", dx)):
                bench.rows.append({"kind": "branch", "shape": name, "n": n, "k": k, "m": m,
                                   "impl": branch, "mode": mode, **t})


def splitk_tiles(bench: Bench, K, name: str, layer, ms: list[int]) -> None:
    """Split-K forward at M <= 16 over a few (bm, bn, bk, split): what the defaults should pick."""
    fused = K.fused_lora
    n, k, pk, g = packed_layer(K, name, layer, seed=3)
    b = torch.randn(n, RANK, device=DEVICE, generator=g) * 0.02
    for m in [v for v in ms if v <= GOAL_SMALL_M]:
        x = torch.randn(m, k, device=DEVICE, dtype=DTYPE, generator=g)
        s = torch.randn(m, RANK, device=DEVICE, dtype=DTYPE, generator=g)
        for bm, bn, bk in SPLITK_SWEEP:
            for split in (1, 2, 4, 8):
                if not bench.time_left():
                    return
                tiles = K.TileConfig(bm, bn, bk, split=split, num_warps=4, num_stages=4)
                config = K.KernelConfig(fwd_tiles=tiles)
                with torch.no_grad():
                    t = bench.measure(partial(fused.base_lora_forward, x, pk, s, b, SCALE, None, "splitk", config))
                bench.rows.append({"kind": "splitk_tiles", "shape": name, "n": n, "k": k, "m": m,
                                   "impl": f"bm{bm}-bn{bn}-bk{bk}-split{split}", "mode": "fwd", **t})


def markdown(env: dict, meta: dict, rows: list[dict]) -> tuple[str, list[str]]:
    """The report and the goal-check lines."""
    def get(kind, shape, m, impl, mode):
        for r in rows:
            if (r["kind"], r["shape"], r["m"], r["impl"], r["mode"]) == (kind, shape, m, impl, mode):
                return r["ms"]
        return None

    lines = [f"# Kernel benchmark: {env['device_name']}", "",
             f"torch {env['torch']}, triton {env['triton']}, bitsandbytes {env['bitsandbytes']}, "
             f"commit {env['commit']}, {env['date']}. LoRA r={RANK}, scale {SCALE}, dropout "
             f"{meta['dropout']}. Median ms (CUDA events, L2 flushed). Ratios > 1: ours is faster.", ""]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    goals = []
    dq = [r for r in rows if r["kind"] == "dequant"]
    if dq:
        lines += ["## NF4 dequant alone (bf16 out)", "", "| shape | bnb ms | ours ms | bnb/ours | GB/s ours | "
                  "best launch | bnb/best |", "|---|---:|---:|---:|---:|---|---:|"]
        for shape in dict.fromkeys(r["shape"] for r in dq):
            b_ms, o_ms = get("dequant", shape, 0, "bnb", "dequant"), get("dequant", shape, 0, "ours", "dequant")
            if None in (b_ms, o_ms):
                continue
            best = min((r for r in dq if r["shape"] == shape and r["impl"].startswith("ours")), key=lambda r: r["ms"])
            gbs = next(r["gb_per_s"] for r in dq if r["shape"] == shape and r["impl"] == "ours")
            lines.append(f"| {shape} | {b_ms:.4f} | {o_ms:.4f} | {b_ms / o_ms:.2f} | {gbs:,.0f} | {best['impl']} | "
                         f"{b_ms / best['ms']:.2f} |")
            goals.append(f"{'PASS' if o_ms <= b_ms else 'FAIL'} dequant {shape}: bnb/ours = {b_ms / o_ms:.2f} "
                         f"(goal >= 1.00; best launch {best['impl']}: {b_ms / best['ms']:.2f})")
            exact = all(r.get("bit_exact_vs_bnb") for r in dq if r["shape"] == shape)
            goals.append(f"{'PASS' if exact else 'FAIL'} dequant {shape}: bit-exact with bitsandbytes")
        lines.append("")
    for mode in ("fwd", "fwd+bwd"):
        lines += [f"## {mode}", "", "| shape | M | ours ms | bnb+LoRA ms | floor ms | bnb/ours | floor/ours | "
                  "peak MiB ours/bnb |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for shape in shapes:
            for m in sorted({r["m"] for r in rows if r["shape"] == shape and r["kind"] == "compare"}):
                o, b, f = (get("compare", shape, m, i, mode) for i in ("ours", "bnb", "floor"))
                if None in (o, b, f):
                    continue
                mem = ""
                if mode == "fwd+bwd":
                    pk = {r["impl"]: r["peak_mib"] for r in rows if r["kind"] == "compare"
                          and r["shape"] == shape and r["m"] == m and r["mode"] == mode}
                    mem = f"{pk['ours']:.0f} / {pk['bnb']:.0f}"
                lines.append(f"| {shape} | {m} | {o:.4f} | {b:.4f} | {f:.4f} | {b / o:.2f} | {f / o:.2f} | {mem} |")
                if m <= GOAL_SMALL_M:
                    ok = b / o >= GOAL_SMALL_SPEEDUP
                    goals.append(f"{'PASS' if ok else 'FAIL'} {mode} {shape} M={m}: bnb+LoRA/ours = "
                                 f"{b / o:.2f} (goal >= {GOAL_SMALL_SPEEDUP})")
                if m >= GOAL_LARGE_M:
                    ok = o <= f
                    goals.append(f"{'PASS' if ok else 'FAIL'} {mode} {shape} M={m}: floor/ours = "
                                 f"{f / o:.2f} (goal >= 1.00)")
        lines.append("")

    branch_rows = [r for r in rows if r["kind"] == "branch"]
    if branch_rows:
        lines += ["## Dispatch branches (ms; best marked *)", "",
                  "| shape | M | GEMM | splitk | tiled | dequant |", "|---|---:|---|---:|---:|---:|"]
        for shape in shapes:
            for mode in ("fwd", "dx"):
                best_by_m = {}
                for m in sorted({r["m"] for r in branch_rows if r["shape"] == shape}):
                    t = {br: get("branch", shape, m, br, mode) for br in ("splitk", "tiled", "dequant")}
                    have = {br: v for br, v in t.items() if v is not None}
                    if not have:
                        continue
                    best = min(have, key=have.get)
                    best_by_m[m] = best
                    cells = [("-" if v is None else f"{v:.4f}" + ("*" if br == best else ""))
                             for br, v in t.items()]
                    lines.append(f"| {shape} | {m} | {mode} | " + " | ".join(cells) + " |")
                if best_by_m:
                    lines.append(f"| {shape} | | {mode} best | " + ", ".join(
                        f"M={m}: {b}" for m, b in best_by_m.items()) + " | | |")
        lines += ["", "Set small_m_max to the largest M where splitk wins and large_m_min to the smallest "
                  "M where dequant wins (KernelConfig in kernels/tiles.py).", ""]

    tile_rows = [r for r in rows if r["kind"] == "splitk_tiles"]
    if tile_rows:
        lines += ["## Split-K tiles (forward ms, fastest 3 per shape and M)", ""]
        for shape in shapes:
            for m in sorted({r["m"] for r in tile_rows if r["shape"] == shape}):
                best = sorted((r for r in tile_rows if r["shape"] == shape and r["m"] == m),
                              key=lambda r: r["ms"])[:3]
                lines.append(f"- {shape} M={m}: " + ", ".join(f"{r['impl']} {r['ms']:.4f}" for r in best))
        lines.append("")
    lines += ["## Goals", "", *[f"- {g}" for g in goals], ""]
    return "\n".join(lines), goals


def write(out: Path, env: dict, meta: dict, rows: list[dict]) -> tuple[Path, list[str]]:
    """The results file and report (benchmarks.harness.write_results); returns its path and the goal lines."""
    text, goals = markdown(env, meta, rows)
    return write_results("kernels", {"environment": env, "settings": meta, "rows": rows}, text, out_dir=out), goals


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: skipped (benchmarks.kernels measures GPU kernels)")
        return 0
    import minilora.kernels as K

    out = Path(args.out or RESULTS_DIR / f"gpu-{datetime.date.today()}")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else list(PHI3))
    ms = args.ms or (QUICK_MS if args.quick else MS)
    env = environment(DEVICE)
    meta = {"dropout": args.dropout,
            "rank": RANK, "scale": SCALE, "quick": args.quick, "argv": sys.argv,
            "thresholds": {"small_m_max": K.DEFAULT_CONFIG.small_m_max,
                           "large_m_min": K.DEFAULT_CONFIG.large_m_min}}
    bench = Bench(args)
    layers = {}
    passes = [dequant, compare] if args.no_sweeps else [dequant, compare, branches, splitk_tiles]  # by priority
    for run_pass in passes:
        for name in shapes:
            if name not in layers:
                layers[name] = make_layer(name)
            run_pass(bench, K, name, layers[name], ms)
            write(out, env, meta, bench.rows)
            if bench.out_of_time:
                break
        if bench.out_of_time:
            print(f"budget of {args.budget_s:.0f}s spent in {run_pass.__name__}: partial results")
            break
    path, goals = write(out, env, {**meta, "complete": not bench.out_of_time}, bench.rows)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print("GOALS:")
    for line in goals:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
