"""Where one training step's time goes: extra steps under torch.profiler, their kernels (GPU) or
operators (CPU) summed into a few categories, so a results file says not only how fast each system is
but what it spends the time on.

    profile_step(step, device) -> {"wall_ms", "total_ms", "categories": {name: ms}, "top": [...], "calls": {...}}

On CUDA the times are the kernels' device time (the GPU's busy time; `wall_ms - total_ms` is roughly
the time it waited for the host). On a CPU they are the operators' self time on the profiled thread.
Used by benchmarks.throughput_systems after the timed steps (the profiled steps are never among them).
"""

import re
import time

import torch

# First match wins, so specific patterns come before generic ones. Patterns are searched (re.search,
# case-insensitive) in CUDA kernel names and in CPU operator names.
CATEGORIES = [
    ("NF4 + LoRA fused GEMM (ours)", r"^_fwd_kernel|^_dx_kernel|_splitk_reduce_kernel"),
    ("NF4 dequant (ours)", r"^_dequant_kernel"),
    ("NF4 dequant / 4-bit GEMM (bitsandbytes)",
     r"kDequantize|kgemm_4bit|dequantize_4bit|gemm_4bit|bitsandbytes|MatMul4Bit"),
    ("attention", r"flash|fmha|attention|sdpa|_efficient_attention"),
    ("GEMM (cuBLAS / aten)", r"gemm|nvjet|cutlass|xmma|sm\d+_.*(?:tn|nt|nn|tt)|aten::(?:mm|addmm|bmm|matmul|linear)$"),
    ("dropout", r"dropout|bernoulli|philox|aten::randint$|aten::random_$"),  # randint: minilora/dropout.py on a CPU
    ("loss (softmax, cross-entropy)", r"softmax|nll_loss|cross_entropy"),
    ("optimizer", r"adam|multi_tensor|_foreach"),
    ("copies and casts", r"memcpy|memset|copy_|aten::to$|_to_copy|cat_|catarray|aten::cat$"),
    ("autograd and Python", r"Backward\d*$|^autograd::|LoRALinear4bitFunction|CheckpointFunction"),
    ("elementwise and norms", r"elementwise|vectorized|unrolled|reduce|aten::(?:mul|add|sub|div|silu|pow|rsqrt|mean|"
                              r"sum|neg|exp|cos|sin|where|fill_|zero_|clamp|sigmoid|tanh|index|embedding)"),
]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]
OTHER = "other"
TOP = 12


def categorize(name: str) -> str:
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return OTHER


def _self_device_us(event) -> float:
    # torch renamed the CUDA-specific attribute to a device-neutral one; keep both spellings working.
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def profile_step(step, device: torch.device, repeat: int = 2) -> dict:
    """Runs `step()` `repeat` times under the profiler; the time per step by category (milliseconds).
    More than one step, because on a shared CPU a single one catches one-off stalls of single ops."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeat):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / repeat
    rows = []
    for avg in prof.key_averages():
        if cuda:
            # Kernels are the rows with device time of their own; CPU operators have none of it.
            us = _self_device_us(avg) if str(getattr(avg, "device_type", "")).endswith("CUDA") else 0.0
        else:
            us = float(avg.self_cpu_time_total)
        if us > 0:
            rows.append((avg.key, categorize(avg.key), us / 1e3 / repeat, int(avg.count) // repeat))
    categories: dict[str, float] = {}
    for _, category, ms, _ in rows:
        categories[category] = categories.get(category, 0.0) + ms
    rows.sort(key=lambda r: -r[2])
    return {"device": device.type, "steps": repeat, "wall_ms": wall_ms, "total_ms": sum(categories.values()),
            "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "category": c, "ms": ms, "count": k} for n, c, ms, k in rows[:TOP]],
            # Calls per step of every operator or kernel: what ran how often, whatever its share of the time.
            "calls": {n[:160]: k for n, _, _, k in rows},
            "what": "kernel device time" if cuda else "operator self CPU time"}


def markdown(run: dict, systems: list[str]) -> list[str]:
    """A table of category times (ms per step) for the systems of one run that were profiled."""
    profiles = {s: run["systems"][s]["profile"] for s in systems
                if "categories" in (run["systems"].get(s, {}).get("profile") or {})}
    if not profiles:
        return []
    names = list(profiles)
    cats = sorted({c for p in profiles.values() for c in p["categories"]},
                  key=lambda c: -max(p["categories"].get(c, 0.0) for p in profiles.values()))
    what = next(iter(profiles.values()))["what"]
    steps = next(iter(profiles.values())).get("steps", 1)
    lines = [f"Where one step's time goes ({what}, ms per step; {steps} extra steps after the timed ones, "
             "under torch.profiler):",
             "", "| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{profiles[s]['categories'].get(c, 0.0):,.1f}" for s in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{profiles[s]['total_ms']:,.1f}**" for s in names) + " |")
    lines.append("| step wall time | " + " | ".join(f"{profiles[s]['wall_ms']:,.1f}" for s in names) + " |")
    return lines + [""]
