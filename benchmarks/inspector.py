"""How long `python -m minilora.inspect` takes on a Phi-3-mini-sized adapter (goal: under 5 s on a CPU).

An r=8 adapter with Phi-3-mini's 128 adapted modules (32 layers x qkv_proj 3072->9216, o_proj
3072->3072, gate_up_proj 3072->16384, down_proj 8192->3072; random factors: the time does not depend
on the values) is written to a temporary folder; the inspector's own API is timed end to end
(reading the safetensors file included), alone and with --compare against a second such adapter.

    python -m benchmarks.inspector [--repeats 3]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from minilora.adapter import CONFIG_NAME, WEIGHTS_NAME, peft_key
from minilora.inspect import inspect

from .harness import environment, write_results

PHI3_MINI = {"self_attn.qkv_proj": (9216, 3072), "self_attn.o_proj": (3072, 3072),
             "mlp.gate_up_proj": (16384, 3072), "mlp.down_proj": (3072, 8192)}


def write_phi3_mini_adapter(folder: Path, seed: int, r: int = 8) -> int:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(32):
        for kind, (out_f, in_f) in PHI3_MINI.items():
            name = f"model.layers.{layer}.{kind}"
            tensors[peft_key(name, "lora_A")] = torch.randn(r, in_f, generator=g) / in_f**0.5
            tensors[peft_key(name, "lora_B")] = torch.randn(out_f, r, generator=g) * 1e-3
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    targets = sorted(kind.split(".")[1] for kind in PHI3_MINI)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": targets}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return len(tensors) // 2


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds of this process) per run: on a shared machine the wall time also
    counts other processes' turns, the CPU time only this one's work."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="folder for the results file (e.g. benchmarks/results); none: print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        n_modules = write_phi3_mini_adapter(a, seed=0)
        write_phi3_mini_adapter(b, seed=1)
        alone = timed(lambda: inspect(a), args.repeats)
        compared = timed(lambda: inspect(a, compare=b), args.repeats)
    env = environment("cpu")
    print(f"device: {env['device_name']}; commit {env['commit']}; {env['date']}")
    print(f"Phi-3-mini-sized adapter, r=8, {n_modules} modules, {args.repeats} runs (median, min-max):")
    rows = {}
    for label, (wall, cpu) in (("inspect", alone), ("inspect --compare", compared)):
        rows[label] = {"wall_s": wall, "cpu_s": cpu, "wall_median_s": statistics.median(wall),
                       "goal_met": statistics.median(wall) < 5.0}
        print(f"  {label:<18} wall {statistics.median(wall):6.2f} s ({min(wall):.2f}-{max(wall):.2f}), "
              f"CPU {statistics.median(cpu):6.2f} s ({min(cpu):.2f}-{max(cpu):.2f})  goal < 5 s")
    if args.out:
        path = write_results("inspector", {"environment": env, "modules": n_modules, "r": 8, "runs": rows},
                             out_dir=args.out)
        print(f"results: {path}")


if __name__ == "__main__":
    main()
