"""Host memory while a base model loads and quantizes: transformers' from_pretrained + minilora's quantization
(the path before streaming) against minilora's streaming loader (minilora/stream_load.py), on the same
checkpoint, each in a fresh process.

The model: a Llama architecture of ~0.6 B weights (hidden 1536, MLP 4096, 20 layers, 12 heads / 4 KV heads,
vocab 32000, untied head) with random bf16 weights, written straight into two safetensors shards tensor by
tensor (names and shapes from the model built on the meta device; no model in memory).

What is measured, per path, in a child process that imports everything first:
    peak     VmHWM (the kernel's high-water mark of the process's resident memory, reset through
             /proc/self/clear_refs after the imports) minus the resident memory after the imports: exact, so
             no short spike between two samples is missed; it counts file pages a memory map made resident
    anon     the largest RssAnon (memory the process allocated, not file pages) sampled every 5 ms: what the
             process itself held, missing spikes shorter than a sample
    after    resident memory once the model is loaded, minus the same baseline
against the budget: the loaded model's bytes (packed 4-bit weights and statistics, fp32 embeddings, norms and
head) plus three decoder layers in fp32 (the compute dtype on a CPU).

    one linear layer  the checkpoint's largest linear weight read, cast and quantized alone, in a fresh process
                      as well: what the streaming peak holds above the model while a layer is quantized

    python -m benchmarks.load_memory [--repeats 1] [--model-dir DIR] [--out benchmarks/results]
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .harness import RESULTS_DIR, environment, write_results

CONFIG = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
              num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
PATHS = ("transformers", "streaming")
ONE_LAYER = "one linear layer"  # the checkpoint's largest linear weight read, cast and quantized alone
MIB = 2**20


def write_model(folder: Path, config: dict = CONFIG, shards: int = 2, seed: int = 0) -> Path:
    """config.json and `shards` safetensors files with an index for a Llama of `config` (LlamaConfig's
    arguments); each tensor drawn and written alone."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    g = torch.Generator().manual_seed(seed)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        keys = names[s * per_shard:(s + 1) * per_shard]
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for k in keys:
            nbytes = 2 * torch.Size(shapes[k]).numel()
            header[k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for k in keys:
                if k.endswith("norm.weight"):
                    t = torch.ones(shapes[k])
                else:
                    t = torch.randn(shapes[k], generator=g) * 0.02
                f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
                weight_map[k] = file
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def proc_status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the loaded model holds: parameters and buffers (each storage once), and the 4-bit layers'
    statistics (absmax, nested absmax and code), which bitsandbytes keeps beside the packed weight."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    return total


def child(path: str, folder: str) -> dict:
    """One load in this process; the measurements as a dict."""
    from transformers import AutoModelForCausalLM

    import minilora
    import minilora.stream_load  # noqa: F401  (imported before the baseline, as transformers is)
    from minilora.quant import quantize_linears

    cpu, dtype = torch.device("cpu"), torch.float32
    baseline = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    peak_anon, done = proc_status("RssAnon"), threading.Event()

    def sample():
        nonlocal peak_anon
        while not done.wait(0.005):
            peak_anon = max(peak_anon, proc_status("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    anon_baseline = peak_anon
    sampler.start()
    started = time.perf_counter()
    if path == "transformers":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        quantize_linears(model, "nf4", True, dtype, cpu)
    elif path == ONE_LAYER:
        model = quantize_largest(Path(folder), dtype, cpu)
    else:
        model = minilora.load_base(folder, quant="nf4", double_quant=True, compute_dtype=dtype, device=cpu)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"path": path, "seconds": round(seconds, 2), "baseline_mib": round(baseline / MIB, 1),
            "peak_mib": round((proc_status("VmHWM") - baseline) / MIB, 1),
            "anon_peak_mib": round((max(peak_anon, proc_status("RssAnon")) - anon_baseline) / MIB, 1),
            "after_mib": round((proc_status("VmRSS") - baseline) / MIB, 1),
            "model_mib": round(model_bytes(model) / MIB, 1)}


def quantize_largest(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """What the streaming loader does to one linear layer, for the checkpoint's largest linear weight."""
    from minilora.quant import quantize_linear
    from minilora.safetensors_reader import TensorReader, read_headers

    stored = read_headers(sorted(folder.glob("*.safetensors")))
    key = max((k for k in stored if k.endswith("proj.weight")), key=lambda k: torch.Size(stored[k].shape).numel())
    out_f, in_f = stored[key].shape
    linear = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
    with TensorReader() as reader:
        linear.weight = torch.nn.Parameter(reader.read(stored[key]).to(dtype), requires_grad=False)
    return quantize_linear(linear, "nf4", True, dtype, device)


def layer_mib(folder: Path) -> float:
    """One decoder layer's weights in fp32, from the checkpoint's header."""
    from minilora.safetensors_reader import read_headers

    stored = read_headers(sorted(folder.glob("*.safetensors")))
    return sum(4 * torch.Size(s.shape).numel() for k, s in stored.items() if ".layers.0." in k) / MIB


def report(payload: dict) -> str:
    budget = payload["budget_mib"]
    lines = [f"# Host memory while loading a 4-bit base ({payload['environment']['date'][:10]})", "",
             f"Model: Llama architecture, {payload['weights']:,} weights, bf16 safetensors in 2 shards; loaded as "
             "NF4 + double quant with fp32 compute on the CPU. Memory above the process's resident memory after its "
             "imports.", "",
             f"Budget: the loaded model ({payload['model_mib']:,.1f} MiB) + 3 fp32 decoder layers "
             f"(3 x {payload['layer_mib']:,.1f} MiB) = **{budget:,.1f} MiB**.", "",
             "| path | peak (VmHWM) MiB | vs budget | anon peak (sampled) MiB | after load MiB | load s |",
             "|---|---:|---:|---:|---:|---:|"]
    for run in (r for r in payload["runs"] if r["path"] in PATHS):
        lines.append(f"| {run['path']} | {run['peak_mib']:,.1f} | {run['peak_mib'] / budget:.2f}x | "
                     f"{run['anon_peak_mib']:,.1f} | {run['after_mib']:,.1f} | {run['seconds']:.1f} |")
    streaming = max(r["peak_mib"] for r in payload["runs"] if r["path"] == "streaming")
    lines += ["", f"The streaming peak is {streaming - payload['model_mib']:,.1f} MiB above the loaded model. One "
              "linear layer, the checkpoint's largest, read, cast to fp32 and quantized alone in a fresh process peaks "
              f"at {payload['one_layer_peak_mib']:,.1f} MiB: the bf16 read, its fp32 copy and bitsandbytes' CPU "
              "quantization temporaries (abs, scaled and clamped copies, int64 bucketize indices); the rest is the "
              "allocator's slack between layers. The transformers path holds the whole model in fp32 before "
              "quantizing, and its VmHWM also counts the pages of the memory-mapped checkpoint it touched "
              "(reclaimable file pages, so its anon column is the fairer comparison)."]
    env = payload["environment"]
    lines += ["", f"{env['device_name']}, {env['torch_threads']} torch threads, commit `{env['commit'][:12]}`, "
              f"torch {env['torch']}, transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}, "
              f"load average {env['load_avg'][0]:.2f} at the start.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="loads per path, the paths taking turns")
    parser.add_argument("--model-dir", type=Path, help="where to write (or find) the model; default: a temp folder")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", choices=(*PATHS, ONE_LAYER), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.model_dir))))
        return
    env = environment("cpu")  # taken at the start, before the loads
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or Path(tmp) / "model"
        if not (folder / "model.safetensors.index.json").exists():
            started = time.perf_counter()
            write_model(folder)
            print(f"wrote {folder} in {time.perf_counter() - started:.1f} s")
        from minilora.safetensors_reader import read_headers

        weights = sum(torch.Size(s.shape).numel() for s in read_headers(sorted(folder.glob("*.safetensors"))).values())
        payload = {"environment": env, "config": CONFIG, "weights": weights,
                   "layer_mib": round(layer_mib(folder), 1), "runs": []}
        for _ in range(args.repeats):
            for path in (*PATHS, ONE_LAYER):
                out = subprocess.run([sys.executable, "-m", "benchmarks.load_memory", "--child", path,
                                      "--model-dir", str(folder)], capture_output=True, text=True, check=True,
                                     cwd=Path(__file__).resolve().parents[1], env={**os.environ})
                run = json.loads(out.stdout.strip().splitlines()[-1])
                print(run)
                payload["runs"].append(run)
        payload["model_mib"] = next(r["model_mib"] for r in payload["runs"] if r["path"] == "streaming")
        payload["one_layer_peak_mib"] = max(r["peak_mib"] for r in payload["runs"] if r["path"] == ONE_LAYER)
        payload["budget_mib"] = round(payload["model_mib"] + 3 * payload["layer_mib"], 1)
        path = write_results("load-memory", payload, report(payload), out_dir=args.out)
        print(report(payload))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
