"""`python train.py --data my.jsonl`, top to bottom: checks, data, base model, LoRA, loop, outputs.

Everything that can be wrong with the user's input (flags, data file, output folder, targets) is
checked before the model's weights are loaded, so a mistake costs seconds, not a model load.
"""

import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from minilora.adapter import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from minilora.atomic import atomic_write_json, atomic_write_text
from minilora.attention import use_varlen_attention
from minilora.data.dataset import Dataset, load_dataset, split_eval
from minilora.dispatch import check_kernel_mode, set_kernel_mode
from minilora.errors import UserError
from minilora.inject import add_lora, count_parameters, linear_layer_kinds, matched_target_names, trainable_summary
from minilora.quant import load_base, load_tokenizer, resolve_model_path
from minilora.training.card import render_card
from minilora.training.checkpoint import newest_intact_checkpoint, read_manifest
from minilora.training.config import TrainConfig
from minilora.training.distributed import DistInfo, barrier, init_distributed, shutdown
from minilora.training.loop import TrainingLoop, TrainingStopped, epoch_batches
from minilora.training.offload import OffloadSaved
from minilora.training.plot import plot_losses, read_metrics
from minilora.training.recompute import enable_recompute

# Settings that may differ on --resume without changing what the run computes.
RESUME_MAY_CHANGE = {"output", "resume", "overwrite", "eval_every", "save_every", "keep_checkpoints",
                     "kernels", "max_bad_steps", "skip_bad_lines", "recompute", "checkpoint_every",
                     "offload_activations"}
RUN_FILES = ("run.json", "metrics.jsonl", "eval.json", "loss.png", "README.md", CONFIG_NAME, WEIGHTS_NAME)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"  # bf16 matmuls are several times slower than fp32 on CPUs
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (its grad scaler is for GPU fp16); use fp32 or bf16")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16 support; use fp16 or auto")
    return requested


COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_output(cfg: TrainConfig) -> None:
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {cfg.output}: exists and is not a folder")
    held = [name for name in (*RUN_FILES, "checkpoints") if (out / name).exists()]
    if cfg.resume or not held:
        return
    if not cfg.overwrite:
        raise UserError(f"--output {cfg.output} already holds a run ({', '.join(held[:3])}); add --resume to "
                        "continue it, --overwrite to replace it, or choose another --output")


def clear_previous_run(out: Path) -> None:
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


@dataclass
class RunData:
    train: Dataset
    train_examples: list
    eval_examples: list
    eval_source: str
    eval_sha256: str | None


def prepare_data(cfg: TrainConfig, tokenizer) -> RunData:
    dataset = load_dataset(cfg.data, tokenizer, cfg.seq_len, cfg.skip_bad_lines)
    if cfg.eval_file:
        held = load_dataset(cfg.eval_file, tokenizer, cfg.seq_len, cfg.skip_bad_lines)
        return RunData(dataset, dataset.examples, held.examples, f"{cfg.eval_file}", held.sha256)
    train, held = split_eval(dataset.examples, cfg.eval_fraction, cfg.seed)
    source = f"{len(held)} examples ({cfg.eval_fraction:.0%}) held out of {cfg.data}" if held else "none"
    return RunData(dataset, train, held, source, None)


def report_data(data: RunData, cfg: TrainConfig) -> None:
    d = data.train
    print(f"data: {d.path}: {d.fmt} format, {len(d.examples)} examples from {d.n_lines} lines; "
          f"{len(data.train_examples)} train, {len(data.eval_examples)} held out")
    if d.n_truncated:
        print(f"data: {d.n_truncated} examples longer than --seq-len {cfg.seq_len} were truncated")
    if d.n_dropped:
        print(f"data: {d.n_dropped} examples had no response token within --seq-len and were dropped")
    if d.skipped:
        lines = ", ".join(str(line) for line, _ in d.skipped[:20]) + (" ..." if len(d.skipped) > 20 else "")
        print(f"data: skipped {len(d.skipped)} bad lines (--skip-bad-lines): {lines}")
        for line, reason in d.skipped[:5]:
            print(f"  {d.path}:{line}: {reason}")


def fingerprint(cfg: TrainConfig, data: RunData, precision: str, world: int) -> dict:
    """What defines the run: a resume must match it exactly."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE}
    values.update(data_sha256=data.train.sha256, eval_sha256=data.eval_sha256, precision=precision,
                  world_size=world)
    return values


def resume_point(cfg: TrainConfig, fp: dict) -> Path:
    folder, notes = newest_intact_checkpoint(cfg.output)
    for note in notes:
        print(f"resume: {note}")
    if folder is None:
        raise UserError(f"--resume: no complete checkpoint in {Path(cfg.output) / 'checkpoints'} to resume from")
    saved = read_manifest(folder)["fingerprint"]
    diffs = [f"{k}: {saved.get(k)!r} -> {fp.get(k)!r}"
             for k in sorted(set(saved) | set(fp)) if saved.get(k) != fp.get(k)]
    if diffs:
        raise UserError(f"--resume: this command differs from the run in {cfg.output}: " + "; ".join(diffs))
    return folder


def check_targets(cfg: TrainConfig) -> None:
    """Match the targets against the architecture on the meta device: no weights, no memory."""
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model_path(cfg.model))
    except (OSError, ValueError) as err:
        raise UserError(f"--model {cfg.model}: cannot read its config ({str(err).splitlines()[0]})") from err
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    known = linear_layer_kinds(skeleton)
    add_lora(skeleton, r=cfg.r, alpha=cfg.alpha, targets=cfg.targets)  # raises UserError if none match
    unknown = [t for t in cfg.targets if "." not in t and t not in known and t not in TrainConfig().targets]
    if unknown:
        raise UserError(f"--targets {', '.join(unknown)}: no such module in {type(skeleton).__name__} "
                        f"(its linear layers: {', '.join(known)})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    import bitsandbytes

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_from_config(cfg: TrainConfig) -> int:
    dist = init_distributed()
    try:
        return _train(cfg, dist)
    finally:
        shutdown(dist)


def _train(cfg: TrainConfig, dist: DistInfo) -> int:
    started = time.time()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    say = print if dist.main else (lambda *a, **k: None)
    precision = resolve_precision(cfg.precision, device)
    check_kernel_mode(cfg.kernels, device)
    set_kernel_mode(cfg.kernels)
    check_output(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    fp = fingerprint(cfg, data, precision, dist.world)
    resume_from = resume_point(cfg, fp) if cfg.resume else None
    check_targets(cfg)
    barrier(dist)  # every rank has checked the output folder before rank 0 changes it
    if dist.main:
        report_data(data, cfg)

    out = Path(cfg.output)
    if dist.main:
        if cfg.overwrite:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # the same LoRA init on every rank
    model = load_base(cfg.model, quant=cfg.quant, compute_dtype=COMPUTE_DTYPE[precision], device=device)
    add_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets, use_rslora=cfg.rslora)
    if dist.enabled:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # but different dropout masks per rank
    use_varlen_attention(model)  # padding-free rows: each example's attention alone, no (T, T) mask
    if cfg.recompute != "none":
        offload = OffloadSaved() if cfg.offload_activations else None
        enable_recompute(model, every=cfg.checkpoint_every, offload=offload, mode=cfg.recompute)
    say(f"model: {cfg.model} ({cfg.quant}, {precision}) on {hardware(device)}; {trainable_summary(model)}")

    pad_id = tokenizer.pad_token_id
    eval_batches = epoch_batches(data.eval_examples, cfg, 0, pad_id, dist.world)
    trainer = TrainingLoop(model, cfg, data.train_examples, eval_batches, pad_id, device, precision, fp, dist)
    run = {"config": cfg.to_dict(), "precision": precision, "compute_dtype": str(COMPUTE_DTYPE[precision]),
           "double_quant": True, "device": str(device), "hardware": hardware(device), "versions": versions(),
           "architecture": type(model).__name__, "command": " ".join(sys.argv), "world_size": dist.world,
           "data": {"format": data.train.fmt, "n_lines": data.train.n_lines, "sha256": data.train.sha256,
                    "n_train": len(data.train_examples), "n_eval": len(data.eval_examples),
                    "n_train_tokens": sum(len(e.input_ids) for e in data.train_examples),
                    "n_train_target_tokens": sum(e.n_targets for e in data.train_examples),
                    "n_truncated": data.train.n_truncated, "n_skipped": len(data.train.skipped),
                    "skipped_lines": [line for line, _ in data.train.skipped], "eval_source": data.eval_source}}
    if resume_from is not None:
        trainer.restore(resume_from)
        say(f"resume: continuing from {resume_from} (step {trainer.state.step}/{trainer.total})")
    if dist.main:
        atomic_write_json(out / "run.json", run)

    try:
        state = trainer.run()
    except TrainingStopped as stop:
        if dist.main:
            plot_losses(read_metrics(out / "metrics.jsonl"), out / "loss.png", f"{cfg.model} (stopped)")
            print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code

    eval_after = trainer.run_eval("after")  # collective: every rank evaluates its share
    if not dist.main:
        return 0
    save_adapter(model, out, cfg.model)
    trainable, total = count_parameters(model)
    times, tokens = trainer.state.step_times[1:] or trainer.state.step_times, trainer.state.step_tokens
    tokens_per_s = sum(tokens[-len(times):]) / max(sum(times), 1e-9) if times else 0.0
    run["result"] = {
        "steps": state.step, "warmup_steps": trainer.warmup, "epochs_done": trainer.stream.epochs_done(),
        "eval_before": state.eval_before, "eval_after": eval_after, "skipped_steps": state.skipped_steps,
        "trainable": trainable, "total_params": total, "trainable_share": f"{100 * trainable / total:.2f}%",
        "trainable_summary": trainable_summary(model), "target_modules": matched_target_names(model),
        "tokens_per_s": tokens_per_s, "wall_time_s": time.time() - started,
        "peak_mem_mb": max((m.get("peak_mem_mb", 0) for m in read_metrics(out / "metrics.jsonl")), default=0),
    }
    atomic_write_json(out / "run.json", run)
    atomic_write_json(out / "eval.json", {"before": state.eval_before, "after": eval_after,
                                          "held_out": data.eval_source})
    plot_losses(read_metrics(out / "metrics.jsonl"), out / "loss.png", f"LoRA r={cfg.r} on {cfg.model}")
    atomic_write_text(out / "README.md", render_card(run, str(out)))
    print_summary(cfg, run)
    return 0


def print_summary(cfg: TrainConfig, run: dict) -> None:
    result, out = run["result"], Path(cfg.output)
    before, after = result["eval_before"], result["eval_after"]
    print()
    print(f"adapter: {out / WEIGHTS_NAME} (+ {CONFIG_NAME}); model card {out / 'README.md'}; "
          f"curves {out / 'loss.png'}")
    if before and after:
        change = 100 * (after["ppl"] - before["ppl"]) / before["ppl"]
        print(f"held-out perplexity: {before['ppl']:.2f} -> {after['ppl']:.2f} ({change:+.1f}%)")
    print(f"{result['steps']} steps in {result['wall_time_s']:.0f} s, {result['tokens_per_s']:,.0f} tokens/s")
    print("load it with PEFT:")
    base = cfg.model if not cfg.model.startswith("builtin:") else resolve_model_path(cfg.model)
    print(f"  model = AutoModelForCausalLM.from_pretrained({base!r})")
    print(f"  model = PeftModel.from_pretrained(model, {str(out)!r})")
