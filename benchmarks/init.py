"""What each LoRA init (`--init zeros|loftq|loftq:4|pissa|pissa:4|olora`) does on a 4-bit base: the quantization error
it leaves per layer, the held-out loss after the same number of steps, and what it costs at load time.

Models (all the built-in tiny Phi-3's architecture and tokenizer, trained on examples/demo.jsonl):

    demo       builtin:tiny-phi3 (random weights: a flat spectrum, no low-rank part for any init to use)
    lowrank    generated: every adapted weight W = L + N, L of rank 8 (= r) and N Gaussian noise at 5% of
               L's entry scale: PiSSA's assumption (a dominant low-rank part) holds
    outliers   generated: the same plus one outlier input channel per 64-weight block, at 80x L's entry
               scale (the large-magnitude channels of trained LLMs, exaggerated): each block's absmax is the
               outlier, the rest of the block rounds to 0 in NF4, so the quantization error is -(L + N) off
               those channels, low-rank plus noise: LoftQ's assumption (a low-rank quantization error) holds

The generated models use intermediate size 768 (a multiple of 64): on a CPU, bitsandbytes 0.50's
dequantize_4bit is wrong for weights whose input size is not a multiple of 64 (the demo model's down_proj,
688 inputs: 25% relative error where NF4's is 9%), which the demo rows show as they are.

Per model and init, one training run (`train.py`'s job: r 8, alpha 16, the default targets, 30 steps,
batch 4 x 2, seq 128, lr 1e-3, seed 42) and then the inspector (`inspect(adapter, model=...)`) for the
quantization errors: `quant_error` (the ordinary base), `init_error` (the model training started from),
`trained_error`. Load time: `load_base(..., lora=dict(init=...))` alone, the median of --repeats loads.

    python -m benchmarks.init [--steps 30] [--repeats 5] [--out benchmarks/results]
    python -m benchmarks.init --load-only      # the demo model's load times alone
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Phi3ForCausalLM

import minilora
from minilora.builtin import build_config, build_tokenizer
from minilora.inspect import inspect
from minilora.model_files import resolve_model_path
from minilora.training.config import TrainConfig, validate
from minilora.training.job import train_from_config

from .harness import PACKAGES, RESULTS_DIR, environment, write_results

ROOT = Path(__file__).resolve().parents[1]
# The exact inits, and pissa:4 / loftq:4 (a randomized SVD with 4 subspace iterations) beside them.
INITS = ("zeros", "loftq", "loftq:4", "pissa", "pissa:4", "olora")
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
RUN = dict(data=str(ROOT / "examples" / "demo.jsonl"), r=8, alpha=16, batch_size=4, grad_accum=2, seq_len=128,
           lr=1e-3, warmup_steps=3, eval_every=0, save_every=0, seed=42)
RANK, NOISE, OUTLIER, ENTRY_STD = 8, 0.05, 80.0, 0.02


def generated_weight(out_f: int, in_f: int, outliers: bool, g: torch.Generator) -> torch.Tensor:
    """L + N [out, in] (see the module docstring), optionally with an outlier input channel per 64 weights."""
    low = torch.randn(out_f, RANK, generator=g) @ torch.randn(RANK, in_f, generator=g) / RANK**0.5 * ENTRY_STD
    w = low + NOISE * ENTRY_STD * torch.randn(out_f, in_f, generator=g)
    if outliers:
        w[:, ::64] = OUTLIER * ENTRY_STD * torch.sign(torch.randn(out_f, len(range(0, in_f, 64)), generator=g))
    return w


def save_generated(folder: Path, outliers: bool, seed: int = 0) -> str:
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    config.intermediate_size = 768
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in TARGETS:
                module.weight.copy_(generated_weight(module.out_features, module.in_features, outliers, g))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def load_seconds(model: str, repeats: int) -> dict[str, float]:
    """init -> median seconds of `load_base(..., lora=dict(init=...))`; the inits take turns, so a change in
    the machine's load over the measurement reaches all of them alike."""
    times = {init: [] for init in INITS}
    for _ in range(repeats):
        for init in INITS:
            torch.manual_seed(0)
            start = time.perf_counter()
            minilora.load_base(model, device="cpu", lora=dict(r=RUN["r"], alpha=RUN["alpha"], init=init))
            times[init].append(time.perf_counter() - start)
    return {init: statistics.median(t) for init, t in times.items()}


def decomposition_seconds(model: str, repeats: int) -> tuple[float, int]:
    """(median seconds, weights) of the exact inits' top-r decomposition alone (lora_init.top_singular on one
    CPU thread, as the load runs it) over every targeted weight of `model`, read beforehand: no reading, no
    quantizing. What exact `pissa` and `loftq` cannot add less than to a load, whatever the rest costs."""
    from minilora.lora_init import one_cpu_thread, top_singular

    full = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    weights = [m.weight.detach() for name, m in full.named_modules() if name.rpartition(".")[2] in TARGETS]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with one_cpu_thread(torch.device("cpu")):
            for w in weights:
                top_singular(w, RUN["r"])
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(weights)


def train_and_inspect(model: str, init: str, steps: int, out: Path) -> dict:
    cfg = TrainConfig(**RUN, model=model, init=init, max_steps=steps, output=str(out))
    validate(cfg)
    assert train_from_config(cfg) == 0
    run = json.loads((out / "run.json").read_text())
    report = inspect(out, model=model)
    rows = {m["name"]: {k: m[k] for k in ("quant_error", "init_error", "trained_error", "init_cancelled",
                                          "trained_cancelled")} for m in report["modules"]}
    return {"eval_before": run["result"]["eval_before"]["loss"], "eval_after": run["result"]["eval_after"]["loss"],
            "train_s": run["result"]["wall_time_s"], "modules": rows}


def summary(modules: dict, key: str) -> tuple[float, float, float]:
    values = [m[key] for m in modules.values()]
    return min(values), statistics.median(values), max(values)


def markdown(payload: dict) -> str:
    env = payload["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in PACKAGES if env.get(k))
    lines = [f"# LoRA inits on a 4-bit base: {env['device_name']}", "",
             f"{env['date']}, commit {env['commit']}; {versions}; {env['torch_threads']} threads on "
             f"{env['cpu_count']} CPUs, load average {[round(x, 2) for x in env['load_avg']]} at the start and "
             f"{payload.get('load_average_end')} at the end.", "",
             f"Training: {json.dumps(payload['run'])}, {payload['steps']} steps. Errors are relative "
             "(||.||_F / ||W||_F), min / median / max over the 16 adapted layers: `quant` the ordinary NF4 base, "
             "`init` the model training starts from, `cut` = 1 - init / quant (the share of the quantization "
             "error the init removes). Load: median of "
             f"{payload['repeats']} `load_base(..., lora=dict(init=...))` calls, and its change from zeros.", ""]
    for name, model in payload["models"].items():
        zeros_load = model["inits"]["zeros"]["load_s"]
        lines += [f"## {name}", "", model["about"], "",
                  "| init | quant error | init error | cut (min / median / max) | held-out loss before -> after "
                  "| load s | vs zeros |", "|---|---:|---:|---:|---:|---:|---:|"]
        for init, r in model["inits"].items():
            q, e, cut = (summary(r["modules"], k) for k in ("quant_error", "init_error", "init_cancelled"))
            lines.append(f"| {init} | {q[1]:.4f} | {e[1]:.4f} | {cut[0]:+.1%} / {cut[1]:+.1%} / {cut[2]:+.1%} "
                         f"| {r['eval_before']:.4f} -> {r['eval_after']:.4f} | {r['load_s']:.3f} "
                         f"| {100 * (r['load_s'] / zeros_load - 1):+.1f}% |")
        lines.append("")
    lines += ["## Goals", ""] + [f"- {'PASS' if g['pass'] else 'FAIL'} {g['what']}: {g['value']}"
                                 for g in payload["goals"]] + [""]
    return "\n".join(lines)


def goals(models: dict) -> list[dict]:
    outliers = models["outliers"]["inits"]
    lowrank = models["lowrank"]["inits"]["loftq"]["modules"]
    demo = models["demo"]["inits"]
    rows = [{"what": f"outliers model: {init} cuts every layer's quantization error by >= 30% (worst layer)",
             "value": f"{min(m['init_cancelled'] for m in outliers[init]['modules'].values()):.1%}",
             "pass": min(m["init_cancelled"] for m in outliers[init]["modules"].values()) >= 0.30}
            for init in ("loftq", "loftq:4")]
    rows.append({"what": "lowrank model (no outliers): loftq's worst-layer cut, for contrast (not a goal)",
                 "value": f"{min(m['init_cancelled'] for m in lowrank.values()):.1%}", "pass": True})
    for init in INITS[1:]:
        extra = demo[init]["load_s"] / demo["zeros"]["load_s"] - 1
        rows.append({"what": f"demo model: {init} adds at most 20% to the load time", "value": f"{extra:+.1%}",
                     "pass": extra <= 0.20})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the results files")
    parser.add_argument("--load-only", action="store_true", help="only the demo model's load times")
    args = parser.parse_args(argv)
    env = environment("cpu")
    if args.load_only:
        seconds = load_seconds("builtin:tiny-phi3", args.repeats)
        alone, n_weights = decomposition_seconds("builtin:tiny-phi3", args.repeats)
        payload = {"environment": env, "repeats": args.repeats, "load_s": seconds, "exact_top_r_alone_s": alone,
                   "load_average_end": [round(x, 2) for x in os.getloadavg()]}
        text = "\n".join([
            f"# LoRA init load times, builtin:tiny-phi3 ({env['date'][:10]})", "",
            f"Median of {args.repeats} `load_base(..., lora=dict(init=...))` calls, the inits taking turns; commit "
            f"{env['commit'][:12]}, {env['device_name']}, {env['cpu_count']} CPUs, load average "
            f"{env['load_avg'][0]:.2f} at the start, {payload['load_average_end'][0]:.2f} at the end. Last row: "
            f"the exact top-{RUN['r']} decomposition alone (lora_init.top_singular, one thread) over the "
            f"{n_weights} targeted weights already in memory, as a share of zeros' whole load.", "",
            "| init | load s | vs zeros |", "|---|---:|---:|"] + [
            f"| {init} | {t:.3f} | {100 * (t / seconds['zeros'] - 1):+.1f}% |" for init, t in seconds.items()] + [
            f"| exact top-{RUN['r']} alone, no load | {alone:.3f} | {100 * alone / seconds['zeros']:.1f}% of zeros |"])
        print(text)
        print(f"results: {write_results('init-load', payload, text + chr(10), out_dir=args.out)}")
        return 0
    abouts = {"demo": "builtin:tiny-phi3, random weights.",
              "lowrank": f"Generated: adapted weights rank-{RANK} + {NOISE:.0%} noise.",
              "outliers": f"Generated: rank-{RANK} + {NOISE:.0%} noise + one outlier input channel per 64 at "
                          f"{OUTLIER:g}x."}
    payload = {"environment": env, "run": RUN, "steps": args.steps, "repeats": args.repeats, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"demo": "builtin:tiny-phi3", "lowrank": save_generated(tmp / "lowrank", outliers=False),
                 "outliers": save_generated(tmp / "outliers", outliers=True)}
        for name, path in paths.items():
            model = payload["models"][name] = {"about": abouts[name], "inits": {}}
            for init in INITS:
                result = model["inits"][init] = train_and_inspect(path, init, args.steps, tmp / f"{name}-{init}")
                print(f"{name} {init}: held-out {result['eval_before']:.4f} -> {result['eval_after']:.4f}", flush=True)
            seconds = load_seconds(path, args.repeats)
            for init in INITS:
                model["inits"][init]["load_s"] = seconds[init]
            model["load_s"] = seconds
            payload["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    payload["goals"] = goals(payload["models"])
    text = markdown(payload)
    print(text)
    print(f"results: {write_results('init', payload, text, out_dir=args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
