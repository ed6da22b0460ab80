"""What `--log-lora-stats N` costs per optimizer step (goal: under 3% at N=10).

Two measurements, both on this machine, in one process:

1. The demo model (builtin:tiny-phi3, the default targets, r=8): full optimizer steps (forward,
   backward, AdamW step; the QUICK test settings, batch 4 x 128 tokens) alternate with the statistics
   call the loop makes on a logged step (`grad_norms` + `record`, one host sync). Overhead at N =
   median(stats) / (N x median(step)).
2. Phi-3-mini's 128 adapted modules (r=8, the real shapes, random factors and gradients): the time of
   the same statistics call, to set against a Phi-3-mini step on the device where it trains.

    python -m benchmarks.lora_stats_cost [--every 10] [--repeats 15]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import minilora
from minilora.lora import LoRALinear
from minilora.training.lora_stats import LoRAStats

from .harness import environment, write_results

PHI3_MINI = {"self_attn.qkv_proj": (9216, 3072), "self_attn.o_proj": (3072, 3072),
             "mlp.gate_up_proj": (16384, 3072), "mlp.down_proj": (3072, 8192)}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def demo_overhead(every: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model, r=8, alpha=16, dropout=0.05)
    model.train()
    optimizer = torch.optim.AdamW(minilora.lora_parameters(model), lr=1e-4)
    stats = LoRAStats(model, every)
    batch = torch.randint(3, 259, (4, 128))

    def step():
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_with_grads():  # the state a logged step is in: gradients present
        model(batch, labels=batch).loss.backward()

    step()
    step_times, stats_times = [], []
    for _ in range(repeats):
        step_times.append(median_time(step, 1))
        step_with_grads()
        stats_times.append(median_time(lambda: stats.record(0, stats.grad_norms()), 1))
        optimizer.zero_grad(set_to_none=True)
    return statistics.median(step_times), statistics.median(stats_times)


class FactorsOnly(nn.Module):
    """A LoRA layer's parameters at a real shape, without a base weight (the statistics never read it)."""

    def __init__(self, out_f: int, in_f: int, r: int = 8):
        super().__init__()
        self.scale = 2.0
        self.lora_A = nn.Parameter(torch.randn(r, in_f) / in_f**0.5)
        self.lora_B = nn.Parameter(torch.randn(out_f, r) * 1e-3)
        self.lora_A.grad, self.lora_B.grad = torch.randn_like(self.lora_A), torch.randn_like(self.lora_B)

    adapter_params = LoRALinear.adapter_params


def phi3_mini_stats_time(repeats: int) -> float:
    stats = LoRAStats.__new__(LoRAStats)
    stats.layers = {f"model.layers.{i}.{kind}": FactorsOnly(*shape)
                    for i in range(32) for kind, shape in PHI3_MINI.items()}
    stats.every, stats.param_names = 10, ["lora_A", "lora_B"]
    return median_time(lambda: stats.record(0, stats.grad_norms()), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", help="folder for the results file (e.g. benchmarks/results); none: print only")
    args = parser.parse_args()
    step_s, stats_s = demo_overhead(args.every, args.repeats)
    phi3_s = phi3_mini_stats_time(args.repeats)
    env = environment("cpu")
    print(f"device: {env['device_name']}; commit {env['commit']}; {env['date']}")
    print(f"demo model (tiny-phi3, r=8, 16 modules), medians of {args.repeats}:")
    print(f"  optimizer step {1e3 * step_s:8.1f} ms   statistics call {1e3 * stats_s:6.2f} ms")
    print(f"  overhead at N={args.every}: {100 * stats_s / (args.every * step_s):.3f}% of step time (goal < 3%)")
    print(f"Phi-3-mini shapes (r=8, 128 modules): statistics call {1e3 * phi3_s:.1f} ms on this CPU "
          f"= {100 * phi3_s / args.every:.3f}% of a 1 s step at N={args.every}")
    if args.out:
        payload = {"environment": env, "every": args.every, "repeats": args.repeats, "demo_step_s": step_s,
                   "demo_stats_s": stats_s, "demo_overhead": stats_s / (args.every * step_s),
                   "phi3_mini_stats_s": phi3_s}
        print(f"results: {write_results('lora-stats', payload, out_dir=args.out)}")


if __name__ == "__main__":
    main()
