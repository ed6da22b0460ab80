"""One epoch over long-tailed instruction data: minilora at its defaults vs the recipe users run today.

    minilora    `python train.py --data ...` (its real job) at its defaults: padding-free micro-batches,
                `--recompute auto` (the mode it chose is recorded per run); optional variants
                (--variants) show what each default buys
    reference   transformers 4-bit (nf4, double quant) + prepare_model_for_kbit_training + PEFT LoRA +
                transformers.Trainer, DataCollatorForSeq2Seq padding to the longest example of each batch,
                gradient checkpointing (use_reentrant=False)

Same base (a Phi-3 architecture with random weights, saved once), same tokenized examples (minilora's
data loader tokenizes for both), same recipe (r 8, alpha 16, dropout 0.05 on the four Phi-3 modules,
batch 4 x 4 accumulation, lr 2e-4, 10 warm-up steps, cosine to 0.1 x lr, clip 1.0, AdamW), one epoch.
Measured per run: the epoch's training time (minilora: its optimizer steps; the reference:
Trainer.train's runtime), the process's wall time (start-up and loading included), real (non-pad)
tokens per second of training time, peak memory (CPU: peak RSS; GPU: max allocated) and the held-out
loss of the adapter it wrote, computed afterwards by one function (minilora's evaluate over padded
batches of the held-out examples, on the same 4-bit base) for every adapter.

    python -m benchmarks.epoch --quick                 # CPU: tiny Phi-3, 1,200 alpaca + 600 chat, seq 512
    python -m benchmarks.epoch --gpu                   # Phi-3-mini shapes at seq 2048
"""

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import PACKAGES, RESULTS_DIR, environment, write_results

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
RECIPE = dict(r=8, alpha=16, dropout=0.05, batch_size=4, grad_accum=4, lr=2e-4, warmup_steps=10, min_lr_ratio=0.1,
              max_grad_norm=1.0, seed=42)
# Phi-3-mini's shapes (random weights) for the GPU mode; the CPU mode uses minilora's built-in tiny Phi-3
# (hidden 256, 4 layers, byte tokenizer), the size at which a CPU epoch takes a minute.
PHI3_MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
                 vocab_size=32064, sliding_window=None, tie_word_embeddings=False)
VARIANTS = {"defaults": [], "selective recompute": ["--recompute", "selective"],
            "full recompute": ["--recompute", "full"], "no recompute": ["--recompute", "none"],
            "padded + full recompute": ["--padding", "--recompute", "full"]}
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "vu", "ze") for b in
         ("n", "r", "sh", "t", "l", "m", "k", "d", "p", "s")]


# --- data -----------------------------------------------------------------------------------------
def _text(rng: random.Random, n_words: int) -> str:
    """Zipf-distributed pseudo-words: a unigram law the adapter can learn within one epoch."""
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    return " ".join(rng.choices(WORDS, weights, k=max(1, n_words)))


def _long_tail(rng: random.Random, median_words: float) -> int:
    return int(rng.lognormvariate(math.log(median_words), 0.9))  # lognormal: most short, a few very long


def make_data(kind: str, n: int, seed: int, scale: float) -> list[dict]:
    """`n` records of an alpaca or chat set whose lengths are long-tailed (median ~1/6 of the longest)."""
    rng = random.Random(f"{kind}:{seed}")
    records = []
    for _ in range(n):
        if kind == "alpaca":
            rec = {"instruction": _text(rng, _long_tail(rng, 6 * scale)),
                   "output": _text(rng, _long_tail(rng, 18 * scale))}
            if rng.random() < 0.4:
                rec["input"] = _text(rng, _long_tail(rng, 8 * scale))
        else:
            turns = rng.choice([1, 1, 1, 2, 3])
            rec = {"messages": [m for _ in range(turns) for m in (
                {"role": "user", "content": _text(rng, _long_tail(rng, 6 * scale))},
                {"role": "assistant", "content": _text(rng, _long_tail(rng, 12 * scale)) })]}
        records.append(rec)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_model(name: str, folder: Path) -> Path:
    """The base: built-in tiny Phi-3, or a random-weight Phi-3-mini (bf16) with the same byte tokenizer."""
    from minilora.builtin import build_tokenizer, save_builtin

    if (folder / "config.json").is_file():
        return folder
    if name == "tiny-phi3":
        return save_builtin(folder)
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = build_tokenizer()
    config = Phi3Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **PHI3_MINI)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # Phi-3-mini in fp32 would be 15 GB
    try:
        model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- the reference (child process) ----------------------------------------------------------------
def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reference(spec: dict) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from minilora.data.dataset import load_dataset

    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    examples = load_dataset(spec["data"], tokenizer, spec["seq_len"]).examples  # the tokens minilora trains on
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    for module in model.modules():  # as minilora.load_base: no in-place CPU repack of the 4-bit weights
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["alpha"], target_modules=TARGETS,
                                             lora_dropout=RECIPE["dropout"], task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=spec["output"], per_device_train_batch_size=RECIPE["batch_size"],
        gradient_accumulation_steps=RECIPE["grad_accum"], num_train_epochs=1, learning_rate=RECIPE["lr"],
        warmup_steps=RECIPE["warmup_steps"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": RECIPE["min_lr_ratio"]}, max_grad_norm=RECIPE["max_grad_norm"],
        weight_decay=0.0, seed=RECIPE["seed"], bf16=cuda, use_cpu=not cuda, save_strategy="no", report_to=[],
        logging_steps=10, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0, disable_tqdm=True)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    metrics = trainer.train().metrics
    model.save_pretrained(spec["output"])
    return {"train_s": metrics["train_runtime"], "peak_mem_mib": peak_memory_mib(device),
            "steps": trainer.state.global_step}


# --- the parent -----------------------------------------------------------------------------------
def run_child(cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    # cwd=ROOT puts the checkout on the child's path (`-m benchmarks.epoch`, `train.py`); no PYTHONPATH, which
    # would also reach the child's own children.
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done


def run_minilora(model: Path, data: Path, out: Path, seq_len: int, extra: list[str], timeout: float) -> dict:
    flags = ["--data", str(data), "--model", str(model), "--output", str(out), "--overwrite", "--seq-len",
             str(seq_len), "--epochs", "1", "--eval-fraction", "0", "--eval-every", "0", "--save-every", "0"]
    for key in ("r", "alpha", "dropout", "batch_size", "grad_accum", "lr", "warmup_steps", "min_lr_ratio",
                "max_grad_norm", "seed"):
        flags += [f"--{key.replace('_', '-')}", str(RECIPE[key])]
    wall, _ = run_child([sys.executable, "train.py", *flags, *extra], timeout)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m["kind"] == "train"]
    run = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "train_s": sum(m["tokens"] / m["tokens_per_s"] for m in steps), "steps": len(steps),
            "peak_mem_mib": run["result"]["peak_mem_mb"], "recompute": run["recompute"]["why"]}


def run_reference_child(model: Path, data: Path, out: Path, seq_len: int, timeout: float) -> dict:
    spec = out.with_suffix(".spec.json")
    spec.write_text(json.dumps({"model": str(model), "data": str(data), "output": str(out), "seq_len": seq_len}))
    wall, done = run_child([sys.executable, "-m", "benchmarks.epoch", "--child", str(spec)], timeout)
    return {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def held_out_loss(model_dir: Path, data: Path, adapter: Path, seq_len: int) -> dict:
    """The one measure for every adapter: minilora's evaluate over padded batches on the 4-bit base."""
    import minilora
    from minilora.adapter import load_adapter
    from minilora.data.batching import make_batches
    from minilora.data.dataset import load_dataset
    from minilora.training.evaluate import evaluate

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = minilora.load_tokenizer(str(model_dir))
    base = minilora.load_base(str(model_dir), compute_dtype=dtype, device=torch.device("cuda" if cuda else "cpu"))
    minilora.add_lora(base, r=RECIPE["r"], alpha=RECIPE["alpha"], targets=TARGETS)
    load_adapter(base, adapter)
    batches = make_batches(load_dataset(str(data), tokenizer, seq_len).examples, 8, 0, 0, tokenizer.pad_token_id)
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if cuda else None
    return evaluate(base, batches, autocast) if autocast else evaluate(base, batches)


def markdown(payload: dict) -> str:
    env, s = payload["environment"], payload["settings"]
    versions = ", ".join(f"{k} {env[k]}" for k in PACKAGES if env.get(k))
    lines = [f"# Epoch benchmark: {env['device_name']}", "",
             f"{env['date']}, commit {env['commit']}; {versions}; {env['torch_threads']} threads on "
             f"{env['cpu_count']} CPUs, load average {[round(x, 2) for x in env['load_avg']]} at the start"
             + (f" and {payload['load_average_end']} at the end" if "load_average_end" in payload else "") + ".", "",
             f"Model {s['model']} (random weights), seq-len {s['seq_len']}, recipe {json.dumps(RECIPE)}; one epoch.",
             "Training time: minilora's optimizer steps / Trainer.train's runtime. Wall: the whole process. "
             "Held-out loss: the same function (minilora's evaluate, padded batches, 4-bit base) for every "
             "adapter.", ""]
    for name, d in payload["datasets"].items():
        ref = d["runs"]["reference"]
        lines += [f"## {name}: {d['n_train']} train / {d['n_eval']} held-out examples, {d['real_tokens']:,} real "
                  f"tokens (median {d['median_len']}, longest {d['max_len']})", "",
                  "| run | training s | speed vs reference | wall s | real tokens/s | peak memory MiB "
                  "| held-out loss | vs reference |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for run, r in d["runs"].items():
            loss_change = 100 * (r["held_out_loss"] / ref["held_out_loss"] - 1)
            lines.append(f"| {run} | {r['train_s']:.1f} | {ref['train_s'] / r['train_s']:.2f}x | {r['wall_s']:.1f} "
                         f"| {d['real_tokens'] / r['train_s']:,.0f} | {r['peak_mem_mib']:,.0f} "
                         f"| {r['held_out_loss']:.4f} | {loss_change:+.2f}% |")
        lines += [""] + [f"- {run}: recompute {r['recompute']}" for run, r in d["runs"].items() if "recompute" in r]
        lines.append("")
    lines += ["## Goals", ""] + [f"- {'PASS' if g['pass'] else 'FAIL'} {g['what']}: {g['value']:.3f}"
                                 for g in payload["goals"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU quick mode (the default without a GPU)")
    p.add_argument("--gpu", action="store_true", help="Phi-3-mini shapes at seq 2048")
    p.add_argument("--n", type=int, help="training examples per set (default 1,200 alpaca + half as many chat)")
    p.add_argument("--sets", nargs="+", default=["alpaca", "chat"], choices=["alpaca", "chat"])
    p.add_argument("--variants", action="store_true", help="also minilora with each default switched off")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--work", type=Path, help="folder for the model, data and adapters (default: a temporary one)")
    p.add_argument("--timeout-s", type=float, default=1800, help="per run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_reference(json.loads(Path(args.child).read_text()))))
        return 0
    gpu = args.gpu and torch.cuda.is_available()
    if args.gpu and not gpu:
        print("error: --gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    name, seq_len, scale = ("phi3-mini", 2048, 4.0) if gpu else ("tiny-phi3", 512, 1.0)
    n = args.n or (600 if gpu else 1200)
    work = args.work or Path(tempfile.mkdtemp(prefix="minilora-epoch-"))
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if gpu else "cpu")
    payload = {"environment": environment(device), "settings": {"model": name, "seq_len": seq_len, "recipe": RECIPE},
               "datasets": {}, "goals": []}
    model = save_model(name, work / name)
    save = lambda data: write_results("epoch", data, markdown(data), out_dir=args.out,
                                      device_label="gpu" if gpu else "cpu")
    for kind in args.sets:
        count = n if kind == "alpaca" else n // 2
        records = make_data(kind, count + count // 20, seed=0, scale=scale)
        train, held = write_jsonl(work / f"{kind}.jsonl", records[:count]), write_jsonl(work / f"{kind}-eval.jsonl",
                                                                                          records[count:])
        lengths = sorted(_lengths(model, train, seq_len))
        d = payload["datasets"][kind] = {"n_train": count, "n_eval": len(records) - count, "runs": {},
                                         "real_tokens": sum(lengths), "median_len": lengths[len(lengths) // 2],
                                         "max_len": lengths[-1]}
        runs = {"reference": None, "minilora": []}
        if args.variants:
            runs.update({f"minilora, {v}": VARIANTS[v] for v in VARIANTS if v != "defaults"})
        for run, extra in runs.items():
            out = work / f"{kind}-{run.replace(' ', '_').replace(',', '')}"
            print(f"{kind}: {run} ...", flush=True)
            result = (run_reference_child(model, train, out, seq_len, args.timeout_s) if extra is None
                      else run_minilora(model, train, out, seq_len, extra, args.timeout_s))
            result["held_out_loss"] = held_out_loss(model, held, out, seq_len)["loss"]
            if hasattr(os, "getloadavg"):  # the CPU may be shared: how busy it was, run by run
                result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            d["runs"][run] = result
            save(payload)  # after every run: a timeout keeps what finished
            print(f"  training {result['train_s']:.1f} s, wall {result['wall_s']:.1f} s, peak "
                  f"{result['peak_mem_mib']:,.0f} MiB, held-out loss {result['held_out_loss']:.4f}", flush=True)
        ref, ours = d["runs"]["reference"], d["runs"]["minilora"]
        payload["goals"] += [
            {"what": f"{kind}: epoch speed minilora / reference >= 2", "value": ref["train_s"] / ours["train_s"],
             "pass": ref["train_s"] / ours["train_s"] >= 2},
            {"what": f"{kind}: held-out loss within 2% of the reference",
             "value": ours["held_out_loss"] / ref["held_out_loss"],
             "pass": abs(ours["held_out_loss"] / ref["held_out_loss"] - 1) <= 0.02}]
        if gpu:
            mem = ours["peak_mem_mib"] / ref["peak_mem_mib"]
            payload["goals"].append({"what": f"{kind}: peak memory minilora / reference <= 0.6", "value": mem,
                                     "pass": mem <= 0.6})
    if hasattr(os, "getloadavg"):
        payload["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    path = save(payload)
    print(markdown(payload))
    print(f"results: {path} (+ .md)")
    return 0


def _lengths(model: Path, data: Path, seq_len: int) -> list[int]:
    import minilora
    from minilora.data.dataset import load_dataset

    return load_dataset(str(data), minilora.load_tokenizer(str(model)), seq_len).examples.lengths.tolist()


if __name__ == "__main__":
    sys.exit(main())
