"""How fast, how lean and how faithful is a minilora training step next to what users would run instead?

Three systems train the same base (a Phi-3 architecture with random weights, saved once and loaded by
each from disk) on the same synthetic batches with the same optimizer, learning rate, seed, dropout
masks and initial LoRA weights:

    ours      minilora: load_base (NF4, double quant) + add_lora + enable_recompute, loss_sum (chunked,
              target tokens only), the hand-written step below
    ref_loop  transformers 4-bit (BitsAndBytesConfig nf4, double quant) + prepare_model_for_kbit_training
              + PEFT LoraConfig + gradient checkpointing (use_reentrant=False), the model's own loss
              (`model(..., labels=...)`: full logits, as users run it), the SAME hand-written step:
              the difference to `ours` is the model, not the loop
    trainer   the same reference model trained by transformers.Trainer, as users run it

Per system: training tokens/s (median over the steps after warm-up), peak memory (GPU: max allocated
and reserved; CPU: peak RSS while training), time to first step (from the start of loading to the end
of optimizer step 1) and the loss at every step. The losses must agree within a tolerance, or the
speed means nothing. On GPU also the model FLOPs utilisation (formula in FLOPS_FORMULA).

Each system runs in its own process (clean peak memory; an OOM or crash costs only that system);
the parent writes <out>/<date>-<device>-train.json and .md after each one, so a timeout keeps data.

    python benchmarks/bench_train.py --quick                      # CPU: small Phi-3, < 5 min on 2 cores
    python benchmarks/bench_train.py                              # GPU: Phi-3-mini at seq 2048 and 512
    python benchmarks/bench_train.py --seqs 2048 --out DIR --budget-s 300
    python benchmarks/plot.py benchmarks/results/<date>-<device>-train.json
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("ours", "ref_loop", "trainer")
REFERENCES = ("ref_loop", "trainer")

# Phi-3-mini-4k-instruct's architecture (shared/ANCHORS.md; sliding_window as in its config.json).
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 original_max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
# For 2 CPU cores: Phi-3's proportions (MLP 2.67x hidden, head dim 64 -> 8 heads) at hidden 512, and a
# vocabulary cut to 4096 so the lm_head is ~14% of the linear FLOPs (Phi-3-mini: 2.7%); at 32064 the
# head of so small a model would be 56% and the benchmark would measure the loss, not the model.
CPU_SMALL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                 original_max_position_embeddings=1024, sliding_window=None, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {"phi3-mini": PHI3_MINI, "cpu-small": CPU_SMALL}

# The seed card's recipe; lr is constant (no warm-up, no decay) in all three systems so the schedule
# implementations cannot differ; it is high enough that the loss visibly moves within a few steps.
LORA = dict(r=8, alpha=16, dropout=0.05)
LR, MAX_GRAD_NORM, SEED = 1e-3, 1.0, 0
# Rows per step: GPU sizes fit an H100 80 GB; 256 is the CPU quick size (one row keeps a step ~1-2 s).
BATCH_FOR_SEQ = {256: 1, 512: 16, 1024: 8, 2048: 4, 4096: 2}
QUICK_BUDGET_S = 270  # --quick must finish in 5 minutes even on a loaded machine
MIN_RUN_S = {True: 20, False: 60}  # by --quick: a system's process takes at least this (imports, loading)
# Loss agreement between ours and each reference, relative. fp32 (CPU): only summation order and the
# chunked loss differ. bf16 (GPU): the reference keeps its residual stream in fp32
# (prepare_model_for_kbit_training upcasts norms and embeddings), ours in bf16, whose epsilon is 2^-8.
PARITY_RTOL = {"fp32": 1e-4, "bf16": 1e-2}
# bf16 dense tensor-core peak, FLOP/s (NVIDIA datasheets: the "with sparsity" figures halved). First
# substring of the device name that matches wins, so the more specific names come first.
PEAK_FLOPS = [("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
              ("H100", 989e12), ("A100", 312e12)]
FLOPS_FORMULA = ("model FLOPs/token = 6*N + 8*L*T*d. N = weights of every linear layer incl. lm_head "
                 "(embeddings excluded); 6N = forward 2N + recompute 2N + input-gradient 2N (the 4-bit base "
                 "gets no weight gradient; LoRA's own FLOPs are ignored). Attention: QK^T and AV cost "
                 "2*T*d per token per layer over the causal half, times 4 (forward, recompute, backward 2x) "
                 "= 8*L*T*d. L layers, T sequence length, d hidden size. MFU = tokens/s * FLOPs/token / "
                 "peak (bf16 dense). Same formula as shared/ANCHORS.md's ceiling figures.")


# --- shared by parent and children ------------------------------------------------------------------
def phi3_config(name: str):
    from transformers import Phi3Config

    config = Phi3Config(**MODELS[name])
    config._attn_implementation = "sdpa"  # transformers' default, written down so all three agree
    return config


def synthetic_tokens(vocab: int, seq: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq) token ids, Zipf-distributed (exponent 1.1) over a shuffled vocabulary: a unigram
    law the LoRA weights can learn within a few steps, so the loss moves and parity is tested on updates,
    not only on the first forward. A pure function of its arguments: every process draws the same data."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-1.1)
    token_of_rank = torch.randperm(vocab, generator=g)
    draws = torch.multinomial(probs / probs.sum(), steps * batch * seq, replacement=True, generator=g)
    return token_of_rank[draws].view(steps, batch, seq)


def linear_weights(config) -> int:
    """N of the FLOP formula: weights of all linear layers (attention, MLP, lm_head) of a Phi-3 config."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = d // config.num_attention_heads
    qkv = d * (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    per_layer = qkv + d * d + d * 2 * f + f * d  # qkv_proj, o_proj, gate_up_proj, down_proj
    return layers * per_layer + d * config.vocab_size


def flops_per_token(config, seq: int) -> float:
    return 6 * linear_weights(config) + 8 * config.num_hidden_layers * seq * config.hidden_size


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


# --- child: one system in its own process --------------------------------------------------------------
class Meter:
    """Step times (device-synchronised), losses and peak memory of one system."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t_start = time.perf_counter()
        self.step_s, self.losses = [], []
        self.t_first_step_end = None
        self._t0 = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self):
        self.sync()
        self._t0 = time.perf_counter()

    def end(self):
        self.sync()
        now = time.perf_counter()
        self.step_s.append(now - self._t0)
        if self.t_first_step_end is None:
            self.t_first_step_end = now

    def reset_peak_memory(self) -> dict:
        """Called once the model is ready: the peaks then cover training only. Returns memory after loading."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return {"allocated_after_load_mib": torch.cuda.memory_allocated(self.device) / 2**20}
        after = _proc_status_mib("VmRSS")
        with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM (peak RSS) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        return {"rss_after_load_mib": after, "peak_rss_load_mib": _proc_status_mib("VmHWM")}

    def peak_memory(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_allocated_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "peak_reserved_mib": torch.cuda.max_memory_reserved(self.device) / 2**20}
        return {"peak_rss_mib": _proc_status_mib("VmHWM")}


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else None


def autocast(spec: dict):
    if spec["precision"] == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(spec["device"].split(":")[0], dtype=torch.bfloat16)


def hand_loop(spec: dict, params: list, loss_fn, batches: list, meter: Meter) -> None:
    """The step `ours` and `ref_loop` share: AdamW (fused on CUDA, foreach on CPU, as minilora.loop),
    constant lr, grad clipping at 1.0. Dropout is re-seeded per step, so all systems draw the same masks."""
    cuda = meter.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, fused=cuda or None,
                            foreach=None if cuda else True)
    for step, batch in enumerate(batches):
        torch.manual_seed(spec["seed"] + step)
        meter.begin()
        with autocast(spec):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.end()
        meter.losses.append(loss.item())


def device_batches(spec: dict, device: torch.device) -> list[dict]:
    ids = synthetic_tokens(spec["vocab"], spec["seq"], spec["batch"], spec["steps"], spec["seed"])
    # Every token is a target (labels = inputs); the loss is the mean over the B*(T-1) shifted targets.
    return [{"input_ids": x.to(device), "labels": x.to(device), "attention_mask": torch.ones_like(x).to(device)}
            for x in ids]


def run_ours(spec: dict, meter: Meter) -> dict:
    import minilora
    from minilora.batching import Batch
    from minilora.loss import CHUNK_ROWS, loss_sum
    from minilora.recompute import enable_recompute

    device = meter.device
    dtype = torch.float32 if spec["precision"] == "fp32" else torch.bfloat16
    t0 = time.perf_counter()
    model = minilora.load_base(spec["model_dir"], quant="nf4", compute_dtype=dtype, device=device)
    torch.manual_seed(spec["seed"])
    minilora.add_lora(model, **LORA)
    # The references start from exactly these weights (A kaiming-uniform, B zero).
    minilora.save_adapter(model, spec["init_dir"])
    enable_recompute(model)
    model.train()
    params = minilora.lora_parameters(model)
    load_s = time.perf_counter() - t0
    mem = meter.reset_peak_memory()
    seq = spec["seq"]
    positions = torch.arange(seq, device=device).expand(spec["batch"], seq)
    batches = [Batch(b["input_ids"], b["labels"], b["attention_mask"], positions, spec["batch"] * (seq - 1),
                     spec["batch"] * seq, ()) for b in device_batches(spec, device)]
    hand_loop(spec, params, lambda b: loss_sum(model, b) / b.n_target_tokens, batches, meter)
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in params),
            "loss_path": f"minilora.loss.loss_sum: target rows of the hidden states -> lm_head + CE in "
                         f"{CHUNK_ROWS}-row chunks under checkpointing, never the full logits"}


def reference_model(spec: dict, device: torch.device):
    """What a user runs: transformers 4-bit loading, prepare_model_for_kbit_training, PEFT LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import minilora

    dtype = torch.float32 if spec["precision"] == "fp32" else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    if device.type == "cpu":
        # As minilora.load_base does: no in-place repack of 4-bit weights on AVX512-BF16 CPUs, so both
        # sides compute the same thing (the repack only serves no-grad inference).
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      target_modules=list(minilora.DEFAULT_TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    copy_initial_lora(model, spec["init_dir"])
    model.train()
    return model


def copy_initial_lora(model, init_dir: str) -> None:
    """ours' initial LoRA weights (PEFT-keyed, no adapter name) into PEFT's `.default` slots; all or nothing."""
    from safetensors.torch import load_file

    from minilora.adapter import WEIGHTS_NAME

    saved = load_file(str(Path(init_dir) / WEIGHTS_NAME))
    state = model.state_dict()
    slots = {k: k.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight",
                                                                              ".lora_B.weight")
             for k in state if ".lora_A.default." in k or ".lora_B.default." in k}
    if sorted(slots.values()) != sorted(saved):
        raise RuntimeError(f"initial LoRA keys differ: {len(saved)} saved by ours, {len(slots)} in PEFT's model")
    with torch.no_grad():
        for key, ours_key in slots.items():
            state[key].copy_(saved[ours_key])


def run_ref_loop(spec: dict, meter: Meter) -> dict:
    t0 = time.perf_counter()
    model = reference_model(spec, meter.device)
    params = [p for p in model.parameters() if p.requires_grad]
    load_s = time.perf_counter() - t0
    mem = meter.reset_peak_memory()
    hand_loop(spec, params, lambda b: model(**b).loss, device_batches(spec, meter.device), meter)
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in params),
            "loss_path": "model(input_ids, attention_mask, labels).loss: full logits, mean CE"}


def run_trainer(spec: dict, meter: Meter) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = meter.device.type == "cuda"
    t0 = time.perf_counter()
    model = reference_model(spec, meter.device)
    load_s = time.perf_counter() - t0
    # One dataset row per sequence; the sequential sampler rebuilds the hand-written loop's batches.
    rows = [{k: v[i] for k, v in b.items()} for b in device_batches(spec, torch.device("cpu"))
            for i in range(spec["batch"])]

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.manual_seed(spec["seed"] + state.global_step)  # the masks the hand-written loop draws
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    step_losses = []

    class LossRecorder(Trainer):
        """Keeps each step's exact loss (the log history rounds it)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step_losses.append(loss)
            return loss

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # the rows in order: the hand-written loop's batches

    # Newer transformers renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(
        output_dir=str(Path(spec["work_dir"]) / "trainer"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=spec["precision"] == "bf16",
        **{ckpt: True, f"{ckpt}_kwargs": {"use_reentrant": False}}, dataloader_pin_memory=cuda,
        use_cpu=not cuda, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=spec["seed"])
    trainer = LossRecorder(model=model, args=args, train_dataset=rows, callbacks=[StepClock()])
    mem = meter.reset_peak_memory()
    output = trainer.train()
    meter.losses = [loss.item() for loss in step_losses]
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "train_runtime_s": output.metrics.get("train_runtime"),
            "loss_path": "Trainer.compute_loss -> model(..., labels).loss: full logits, CE normalised by the "
                         "target count; optimizer " + args.optim}


def run_system(system: str, spec: dict) -> dict:
    """One system, in this process: its result with step times, losses and memory (status OOM on OOM)."""
    torch.set_num_threads(spec["threads"])
    meter = Meter(torch.device(spec["device"]))
    result = {"system": system, "status": "ok"}
    try:
        result.update({"ours": run_ours, "ref_loop": run_ref_loop, "trainer": run_trainer}[system](spec, meter))
    except torch.OutOfMemoryError as err:
        result.update(status="OOM", error=str(err).splitlines()[0])
    result.update(meter.peak_memory(), step_s=meter.step_s, losses=meter.losses,
                  tokens_per_step=spec["batch"] * spec["seq"])
    if meter.t_first_step_end is not None:
        result["time_to_first_step_s"] = meter.t_first_step_end - meter.t_start
    return result


def child_main(system: str, spec_path: str, out_path: str) -> int:
    result = run_system(system, json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0


# --- parent: plan, run, summarise, write -----------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results files")
    p.add_argument("--budget-s", type=float,
                   help="start no system that would end after this many seconds; results so far are kept "
                        f"(default {QUICK_BUDGET_S}s with --quick, none otherwise)")
    p.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "minilora-bench-models"),
                   help="where the random-weight base models are saved (reused across runs)")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty and sha != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, threads: int) -> dict:
    import bitsandbytes
    import peft
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor() or "cpu")
    return {"device": device.type, "device_name": name, "cpu_count": os.cpu_count(), "torch_threads": threads,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__, "commit": git_commit(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv,
            "load_avg_at_start": os.getloadavg()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def device_slug(env: dict) -> str:
    if env["device"] == "cpu":
        return "cpu"
    name = env["device_name"].lower().replace("nvidia", "")
    return "-".join("".join(c if c.isalnum() else " " for c in name).split()) or "gpu"


def saved_model(name: str, dtype: torch.dtype, device: torch.device, cache: Path) -> Path:
    """The random-weight base, saved once per (config, dtype, seed) and reused; written atomically."""
    config = phi3_config(name)
    key = hashlib.sha256(json.dumps([config.to_dict(), str(dtype), SEED], sort_keys=True, default=str)
                         .encode()).hexdigest()[:12]
    folder = cache / f"{name}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import Phi3ForCausalLM

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
    previous = torch.get_default_dtype()
    torch.manual_seed(SEED)
    try:
        torch.set_default_dtype(dtype)  # built directly in the saved dtype: Phi-3-mini in fp32 would be 15 GB
        with torch.device(device):
            model = Phi3ForCausalLM(config)
        model.save_pretrained(tmp)
    finally:
        torch.set_default_dtype(previous)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the parent keeps no GPU memory while the systems run
    tmp.rename(folder)
    return folder


def run_child(system: str, spec: dict, work: Path, timeout_s: float) -> dict:
    spec_path, out_path, log_path = work / "spec.json", work / f"{system}.json", work / f"{system}.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    out_path.unlink(missing_ok=True)  # never read an earlier round's result as this one's
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--spec", str(spec_path),
           "--child-out", str(out_path)]
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=work).returncode
        except subprocess.TimeoutExpired:
            return {"system": system, "status": f"TIMEOUT after {timeout_s:.0f}s (budget)"}
    if out_path.is_file():
        return json.loads(out_path.read_text())
    tail = log_path.read_text().strip().splitlines()[-12:]
    oom = any("OutOfMemory" in line or "out of memory" in line for line in tail)
    return {"system": system, "status": "OOM" if oom else f"failed (rc {rc})", "log_tail": tail}


def merge_rounds(rounds: list[dict], warmup: int) -> dict:
    """One system's runs -> its summary. tokens/s pools every timed step of every good round: rounds run
    the systems in alternating order, so a load change on a shared machine falls on all of them alike."""
    ok = [r for r in rounds if r.get("status") == "ok" and len(r.get("step_s", [])) > warmup]
    merged = {k: v for k, v in (ok or rounds)[0].items() if k != "step_s"}
    merged["round_status"] = [r.get("status") for r in rounds]
    if not ok:
        return merged

    def rate(r):
        return [r["tokens_per_step"] / s for s in r["step_s"][warmup:]]

    tps = sorted(t for r in ok for t in rate(r))
    q = statistics.quantiles(tps, n=5) if len(tps) > 1 else [tps[0]] * 4
    merged.update(status="ok", tokens_per_s=statistics.median(tps), tokens_per_s_p20=q[0], tokens_per_s_p80=q[3],
                  tokens_per_s_best_step=tps[-1], timed_steps=len(tps),
                  tokens_per_s_by_round=[statistics.median(rate(r)) for r in ok],
                  time_to_first_step_s=statistics.median(r["time_to_first_step_s"] for r in ok),
                  losses_max_diff_between_rounds=max((abs(a - b) for r in ok[1:]
                                                      for a, b in zip(ok[0]["losses"], r["losses"], strict=False)),
                                                     default=None))
    for key in ("peak_allocated_mib", "peak_reserved_mib", "peak_rss_mib"):
        if ok[0].get(key) is not None:
            merged[key] = max(r[key] for r in ok)
    if ok[0].get("rss_after_load_mib") is not None:
        merged["rss_growth_in_training_mib"] = max(r["peak_rss_mib"] - r["rss_after_load_mib"] for r in ok)
    return merged


def memory_mib(result: dict) -> float | None:
    return result.get("peak_allocated_mib") or result.get("peak_rss_mib")


def compare(run: dict) -> None:
    """Ratios ours / reference and loss parity, in place."""
    ours = run["systems"].get("ours", {})
    rtol = PARITY_RTOL[run["precision"]]
    run["ratios"], run["parity"] = {}, {}
    for ref in REFERENCES:
        other = run["systems"].get(ref)
        if not other or ours.get("status") != "ok" or other.get("status") != "ok":
            continue
        r = {}
        for key in ("tokens_per_s", "tokens_per_s_best_step"):
            if ours.get(key) and other.get(key):
                r[key] = ours[key] / other[key]
        if memory_mib(ours) and memory_mib(other):
            r["peak_memory"] = memory_mib(ours) / memory_mib(other)
        if ours.get("peak_reserved_mib") and other.get("peak_reserved_mib"):
            r["peak_reserved"] = ours["peak_reserved_mib"] / other["peak_reserved_mib"]
        if ours.get("time_to_first_step_s") and other.get("time_to_first_step_s"):
            r["time_to_first_step"] = ours["time_to_first_step_s"] / other["time_to_first_step_s"]
        run["ratios"][ref] = r
        a, b = ours["losses"], other["losses"]
        diffs = [abs(x - y) for x, y in zip(a, b, strict=False)]
        rel = [d / abs(y) for d, y in zip(diffs, b, strict=False)]
        run["parity"][ref] = {
            "steps": [len(a), len(b)], "max_abs_diff": max(diffs, default=None),
            "max_rel_diff": max(rel, default=None), "rtol": rtol,
            "loss_change_ours": a[-1] - a[0] if a else None,
            "ok": len(a) == len(b) > 0 and all(math.isfinite(x) for x in a + b) and max(rel) <= rtol}
    if run["device"] == "cuda" and run.get("peak_flops"):
        for res in run["systems"].values():
            if res.get("tokens_per_s"):
                res["mfu"] = res["tokens_per_s"] * run["flops_per_token"] / run["peak_flops"]


def goals(results: dict) -> list[dict]:
    """The issue's goals, each PASS / FAIL / n/a with the measured value."""
    out = []

    def add(text, value, ok):
        out.append({"goal": text, "value": value, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    for run in results["runs"]:
        tag = f"seq {run['seq']}"
        ratios, parity = run.get("ratios", {}), run.get("parity", {})
        for ref in REFERENCES:
            p = parity.get(ref)
            add(f"{tag}: losses ours vs {ref} agree (rtol {PARITY_RTOL[run['precision']]:g})",
                p and p["max_rel_diff"], p and p["ok"])
        if run["device"] == "cpu":
            v = ratios.get("ref_loop", {}).get("tokens_per_s")
            loads = [x["load_avg_after"][0] for rs in run["raw"].values() for x in rs if "load_avg_after" in x]
            noisy = (f" [noisy: load average up to {max(loads):.1f} on {results['env']['cpu_count']} CPUs]"
                     if loads and max(loads) > results["env"]["cpu_count"] else "")
            add(f"{tag}: tokens/s ours / ref_loop >= 1.0 (CPU){noisy}", v, None if v is None else v >= 1.0)
            continue
        if run["seq"] != 2048 or run["model"] != "phi3-mini":
            continue
        for ref in REFERENCES:
            v = ratios.get(ref, {}).get("tokens_per_s")
            add(f"{tag}: tokens/s ours / {ref} >= 2.0", v, None if v is None else v >= 2.0)
        for ref in REFERENCES:
            v = ratios.get(ref, {}).get("peak_memory")
            add(f"{tag}: peak allocated ours / {ref} <= 0.6", v, None if v is None else v <= 0.6)
        v = run["systems"].get("ours", {}).get("mfu")
        add(f"{tag}: MFU ours >= 50%", v, None if v is None else v >= 0.5)
    return out


def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"# Training benchmark: {env['device_name']}", "",
             f"{env['date']}, commit {env['commit']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}; {env['torch_threads']} threads on "
             f"{env['cpu_count']} CPUs, load average {' / '.join(f'{x:.2f}' for x in env['load_avg_at_start'])} "
             "(1/5/15 min) at the start.", ""]
    s = results["settings"]
    lines += [f"LoRA r={LORA['r']}, alpha={LORA['alpha']}, dropout={LORA['dropout']} on "
              f"{', '.join(s['targets'])}; NF4 + double quant; AdamW lr {s['lr']} constant, clip {MAX_GRAD_NORM}. "
              f"{s['steps']} steps per run, {s['rounds']} run(s) per system in alternating order; tokens/s = "
              f"median over every run's last {s['steps'] - s['warmup']} steps (p20-p80 in brackets). Ratios are "
              "ours / that system (tokens/s: > 1 is ours faster; memory: < 1 is ours smaller). Synthetic Zipf "
              "tokens, every token a target; identical batches, initial LoRA weights and dropout masks (RNG "
              "re-seeded per step) in all systems.", ""]
    for run in results["runs"]:
        cfg = run["config"]
        mem_head = "peak alloc / reserved MiB" if run["device"] == "cuda" else "peak RSS MiB (growth in training)"
        lines += [f"## {run['model']} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
                  f"{cfg['vocab_size']}), seq {run['seq']}, batch {run['batch']}, {run['precision']}", "",
                  f"| system | tokens/s | ours / it | {mem_head} | ours / it | time to 1st step s | "
                  "loss first -> last | max rel. loss diff vs ours | MFU |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for name in SYSTEMS:
            r = run["systems"].get(name)
            if r is None:
                continue
            if r.get("status") != "ok":
                lines.append(f"| {name} | {r.get('status')} | | | | | | | |")
                continue
            ratio = run.get("ratios", {}).get(name, {})
            tps = (f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_p20']:,.0f}-{r['tokens_per_s_p80']:,.0f})"
                   if r.get("tokens_per_s") else "-")
            mem = (f"{r['peak_allocated_mib']:,.0f} / {r['peak_reserved_mib']:,.0f}" if "peak_allocated_mib" in r
                   else f"{_f(r.get('peak_rss_mib'), '{:,.0f}')} "
                        f"({_f(r.get('rss_growth_in_training_mib'), '{:+,.0f}')})")
            losses = r.get("losses") or []
            loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
            par = run.get("parity", {}).get(name)
            lines.append(f"| {name} | {tps} | {_f(ratio.get('tokens_per_s'))} | {mem} | "
                         f"{_f(ratio.get('peak_memory'))} | {_f(r.get('time_to_first_step_s'), '{:.1f}')} | {loss} | "
                         f"{_f(par and par['max_rel_diff'], '{:.1e}')} | {_f(r.get('mfu'), '{:.1%}', 'n/a')} |")
        loads = [x["load_avg_after"][0] for runs in run["raw"].values() for x in runs if "load_avg_after" in x]
        best = [f"{name} {r['tokens_per_s_best_step']:,.0f}" + (
                    f" (ours / it {run['ratios'][name]['tokens_per_s_best_step']:.2f})"
                    if "tokens_per_s_best_step" in run.get("ratios", {}).get(name, {}) else "")
                for name, r in run["systems"].items() if r.get("tokens_per_s_best_step")]
        lines += ["", f"Fastest single step, tokens/s (the one least disturbed by other processes): {', '.join(best)}."]
        if run["device"] == "cpu" and loads and max(loads) > results["env"]["cpu_count"]:
            lines += ["", f"Other processes competed for the {results['env']['cpu_count']} CPUs (1-minute load average "
                      f"after each run: {', '.join(f'{x:.1f}' for x in loads)}): step times are noisy, and ratios "
                      "within the p20-p80 spread are not a measured difference."]
        lines.append("")
        if run["device"] == "cuda":
            lines += [f"MFU: {run['flops_per_token'] / 1e9:.2f} GFLOP/token against "
                      f"{_f(run.get('peak_flops') and run['peak_flops'] / 1e12, '{:.0f}', 'unknown')} TFLOP/s "
                      "bf16 dense peak.", ""]
    lines += ["## Goals", "", *[f"- {g['status']} {g['goal']}: {_f(g['value'], '{:.3g}')}" for g in results["goals"]],
              "", "## Method", "", *[f"- {n}" for n in results["notes"]], f"- {FLOPS_FORMULA}", ""]
    return "\n".join(lines)


def write(results: dict, out: Path, stem: str) -> Path:
    results["goals"] = goals(results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    return path


NOTES = [
    "ours and ref_loop run the same hand-written step (hand_loop); trainer is transformers.Trainer "
    "(TrainingArguments: gradient (activation) checkpointing with use_reentrant=False, constant lr, sequential "
    "sampler, "
    "adamw_torch on CPU / adamw_torch_fused on GPU). ref_loop vs trainer isolates the loop; ours vs ref_loop "
    "isolates the model.",
    "Loss: ours sums cross-entropy over target tokens in chunks (minilora.loss) and divides by their count; the "
    "references use the model's own loss from full logits (what users run). Both are the mean over B*(T-1) tokens.",
    "Dropout 0.05 is on in all systems: torch.manual_seed(seed + step) before every step (the trainer via "
    "on_step_begin) and the same module order give identical masks, checkpoint recompute included.",
    "Precision: fp32 on CPU (NF4 compute dtype fp32, no autocast); bf16 on GPU (compute dtype bf16 + bf16 "
    "autocast in all three; the reference's norms, embeddings and lm_head are fp32 after "
    "prepare_model_for_kbit_training, as users get them).",
    "On CPU the references' Linear4bit layers get support_avx512bf16_for_cpu = False, as minilora.load_base "
    "sets it: no in-place repack of the 4-bit weights, so both sides compute the same thing.",
    "Each system runs in its own process, one after the other. Time to first step: from the start of the "
    "system's setup (its library imports after torch, loading, quantisation, LoRA setup) to the end of optimizer "
    "step 1 (warm-up and, on GPU, kernel compilation included). Peak memory "
    "is reset after loading, so it covers training (weights included). Step times exclude data loading and the "
    "trainer's logging (on_step_begin -> on_step_end); all are device-synchronised.",
]


def make_spec(model_dir: Path, device: torch.device, seq: int, batch: int, steps: int, vocab: int,
              work: Path) -> dict:
    """Everything a system's process needs, JSON-serialisable."""
    return {"model_dir": str(model_dir), "device": str(device),
            "precision": "bf16" if device.type == "cuda" else "fp32", "seq": seq, "batch": batch, "steps": steps,
            "lr": LR, "seed": SEED, "vocab": vocab, "threads": torch.get_num_threads(),
            "init_dir": str(work / "init_adapter"), "work_dir": str(work)}


def new_run(model_name: str, config, spec: dict, device_name: str) -> dict:
    cuda = spec["device"].startswith("cuda")
    return {"model": model_name, "config": {k: getattr(config, k) for k in MODELS.get(model_name, PHI3_MINI)},
            "seq": spec["seq"], "batch": spec["batch"], "device": "cuda" if cuda else "cpu",
            "precision": spec["precision"], "flops_per_token": flops_per_token(config, spec["seq"]),
            "n_linear_weights": linear_weights(config), "peak_flops": peak_flops(device_name) if cuda else None,
            "systems": {}, "raw": {}}


def record(run: dict, result: dict, warmup: int) -> None:
    """Adds one process's result to the run and recomputes the summary, ratios and parity."""
    system = result["system"]
    run["raw"].setdefault(system, []).append(result)
    run["systems"][system] = merge_rounds(run["raw"][system], warmup)
    compare(run)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("minilora") is None:
        # An uninstalled checkout: the children inherit the path through PYTHONPATH. (Not put first: the
        # repo's kernels/ folder would shadow the `kernels` package bitsandbytes looks for.)
        sys.path.append(str(ROOT))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
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

    env = environment(device, torch.get_num_threads())
    stem = f"{datetime.date.today()}-{device_slug(env)}-train"
    out = Path(args.out)
    import minilora

    precision = "bf16" if cuda else "fp32"
    results = {"env": env, "settings": {"model": model_name, "seqs": seqs, "steps": steps, "warmup": warmup,
                                        "lr": LR, "seed": SEED, "precision": precision, "lora": LORA,
                                        "targets": list(minilora.DEFAULT_TARGETS), "quick": quick,
                                        "rounds": rounds, "budget_s": budget},
               "flops_formula": FLOPS_FORMULA, "notes": NOTES, "runs": []}
    print(f"{env['device_name']}: {model_name}, seqs {seqs}, {steps} steps ({warmup} warm-up), {rounds} round(s), "
          f"{precision}; load average {env['load_avg_at_start'][0]:.2f}", flush=True)
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
                             steps, config.vocab_size, work)
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
                    write(results, out, stem)
                    rate = statistics.median(res["tokens_per_step"] / s for s in res["step_s"][warmup:]) \
                        if len(res.get("step_s", [])) > warmup else None
                    print(f"seq {seq} round {rnd + 1} {system:8s} {res['status']:>4s}  {_f(rate, '{:,.0f}')} tokens/s"
                          f"  mem {_f(memory_mib(res), '{:,.0f}')} MiB  1st step "
                          f"{_f(res.get('time_to_first_step_s'), '{:.1f}')}s  ({res.get('wall_s', 0):.0f}s)",
                          flush=True)
                    if "log_tail" in res:
                        print("   " + "\n   ".join(res["log_tail"]), flush=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    results["wall_s"] = time.monotonic() - started
    path = write(results, out, stem)
    print(markdown(results))
    print(f"wrote {path} and {path.with_suffix('.md')} ({results['wall_s']:.0f}s)")
    counts = {k: sum(g["status"] == k for g in results["goals"]) for k in ("PASS", "FAIL", "n/a")}
    print("goals: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + "; failed: "
          + ("; ".join(g["goal"] for g in results["goals"] if g["status"] == "FAIL") or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
