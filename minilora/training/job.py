"""`python train.py --data my.jsonl`, top to bottom: checks, data, base model, LoRA, loop, outputs.

Everything that can be wrong with the user's input (flags, data file, output folder, targets) is
checked before the model's weights are loaded, so a mistake costs seconds, not a model load.
"""

import platform
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from minilora.adapter import CONFIG_NAME, WEIGHTS_NAME, read_initial_factors
from minilora.atomic import atomic_write_json, atomic_write_text
from minilora.attention import use_varlen_attention
from minilora.data.cache import default_root
from minilora.data.dataset import Dataset, load_dataset, sample_eval, split_eval
from minilora.dispatch import check_kernel_mode
from minilora.errors import UserError
from minilora.fsdp_nf4 import base_bytes
from minilora.inject import (
    add_lora,
    count_parameters,
    linear_layer_kinds,
    matched_target_names,
    set_kernel_mode,
    trainable_summary,
    unmatched_targets,
)
from minilora.lock import LOCK_NAME, FolderLock
from minilora.lora_init import changes_base
from minilora.model_files import describe_changes, model_file_digests
from minilora.quant import load_base, load_tokenizer, resolve_model_path, unloadable_model
from minilora.run_record import RUN_FILE, read_run_record, write_run_record
from minilora.training.card import render_card
from minilora.training.checkpoint import FULL_FORMAT, checkpoint_format, newest_intact_checkpoint, read_manifest
from minilora.training.config import FREE, STEER, TrainConfig, resume_fields
from minilora.training.distributed import DistInfo, barrier, gather_objects, host_first, init_distributed, shutdown
from minilora.training.fsdp import LoadSharder, ensure_process_group
from minilora.training.loop import StopRequest, TrainingLoop, TrainingStopped, epoch_batches, max_micro_batch_tokens
from minilora.training.metrics import METRICS_NAME, read_metrics
from minilora.training.offload import OffloadSaved
from minilora.training.recompute import choose_mode, enable_recompute
from minilora.training.run_plots import plot_run
from minilora.training.sharded_checkpoint import SHARDED_FORMAT

RUN_FILES = (RUN_FILE, METRICS_NAME, "eval.json", "loss.png", "lora_stats.png", "README.md", CONFIG_NAME, WEIGHTS_NAME)


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
    # What only a run writes; a README.md alone may be the user's own (the card would replace it).
    markers = (RUN_FILE, METRICS_NAME, "checkpoints", CONFIG_NAME, WEIGHTS_NAME)
    held = [name for name in markers if (out / name).exists()]
    if cfg.resume or cfg.overwrite:
        return
    if not held and (out / "README.md").exists():
        raise UserError(f"--output {cfg.output} holds a README.md that is not from a run; the model card would "
                        "replace it. Choose another --output")
    if held:
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


def prepare_data(cfg: TrainConfig, tokenizer, dist: DistInfo | None = None) -> RunData:
    """Each host's local rank 0 prepares (or finds) each file's token store in the data cache; the host's
    other ranks then map the same files, so the token ids exist once in each host's memory. Preparations
    into one cache folder take turns (a lock in it), so a cache on a file system that several hosts share
    is prepared once, by the first host, and found ready by the others."""
    dist, root = dist or DistInfo(), Path(cfg.data_cache or default_root())

    def prepare_or_find(path: str) -> Dataset:
        root.mkdir(parents=True, exist_ok=True)
        with FolderLock(root / LOCK_NAME, f"data cache {root}", wait=True):
            return load_dataset(path, tokenizer, cfg.seq_len, cfg.skip_bad_lines, cache_dir=root, progress=dist.main)

    def load(path: str) -> Dataset:
        return host_first(lambda: prepare_or_find(path), dist)

    dataset = load(cfg.data)
    cap = cfg.eval_max_examples
    if cfg.eval_file:
        held = load(cfg.eval_file)
        chosen = sample_eval(held.examples, cfg.seed, cap)
        sampled = f" ({len(chosen)} of {len(held.examples)} examples, a seeded sample)" if len(chosen) < len(
            held.examples) else ""
        return RunData(dataset, dataset.examples, chosen, f"{cfg.eval_file}{sampled}", held.sha256)
    train, held = split_eval(dataset.examples, cfg.eval_fraction, cfg.seed, cap)
    share = f"{cfg.eval_fraction:.0%}" + (f", at most {cap}" if cap and len(held) == cap else "")
    source = f"{len(held)} examples ({share}) held out of {cfg.data}" if len(held) else "none"
    return RunData(dataset, train, held, source, None)


def report_data(data: RunData, cfg: TrainConfig) -> None:
    d = data.train
    if d.cached:
        print(f"data: cached {d.store} ({d.n_tokens:,} tokens; checked in {d.seconds:.1f} s)")
    else:
        where = f"; cached in {d.store}" if d.store else ""
        print(f"data: prepared {d.n_lines:,} lines in {d.seconds:.1f} s "
              f"({d.n_lines / max(d.seconds, 1e-9):,.0f} examples/s){where}")
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
    """What defines the run: a resume must match it exactly. The base model and the data files count by
    content (`base_files`: None for a hub model not downloaded yet; job.py fills it in after the load)."""
    free = resume_fields(FREE)
    values = {k: v for k, v in cfg.to_dict().items() if k not in free}
    values.update(data_sha256=data.train.sha256, eval_sha256=data.eval_sha256, precision=precision,
                  world_size=world, base_files=model_file_digests(cfg.model))
    if cfg.fsdp:  # sharded checkpoints load on any number of ranks: what must stay is the global batch
        del values["world_size"], values["grad_accum"]
        values["rank_micro_batches_per_step"] = world * cfg.grad_accum
    return values


def _difference(key: str, old, new) -> str:
    """One difference between a checkpoint's fingerprint and this command's, in bounded words."""
    if key == "base_files":
        return f"base_files: the files of the base model changed ({describe_changes(old or {}, new or {})})"
    if key in ("data_sha256", "eval_sha256") and isinstance(old, str) and isinstance(new, str):
        which = "data" if key == "data_sha256" else "held-out data"
        return f"{key}: the {which} file's content changed (sha256 {old[:12]}... -> {new[:12]}...)"
    return f"{key}: {_bounded(old)} -> {_bounded(new)}"


def _bounded(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def resume_point(cfg: TrainConfig, fp: dict) -> tuple[Path, dict]:
    """The checkpoint to continue from, and the steering flags that changed ({name: [old, new]})."""
    folder, notes = newest_intact_checkpoint(cfg.output)
    for note in notes:
        print(f"resume: {note}")
    if folder is None:
        raise UserError(f"--resume: no complete checkpoint in {Path(cfg.output) / 'checkpoints'} to resume from")
    manifest, steer = read_manifest(folder), resume_fields(STEER)
    check_checkpoint_kind(cfg, folder, checkpoint_format(manifest))
    saved = manifest["fingerprint"]
    check_global_batch(cfg, fp, saved)
    check_same_run(cfg, fp, saved, skip=steer | ({"base_files"} if fp.get("base_files") is None else set()))
    changed = {k: [saved[k], fp[k]] for k in sorted(steer) if k in saved and saved[k] != fp[k]}
    for k, (old, new) in changed.items():
        print(f"resume: --{k.replace('_', '-')} {old!r} -> {new!r} for the rest of the run")
    return folder, changed


def check_checkpoint_kind(cfg: TrainConfig, folder: Path, kind: str) -> None:
    """A sharded checkpoint resumes only under --fsdp, a full one only without."""
    if kind != (SHARDED_FORMAT if cfg.fsdp else FULL_FORMAT):
        how = "with" if kind == SHARDED_FORMAT else "without"
        raise UserError(f"--resume: {folder} is a {kind} checkpoint, written {how} --fsdp; resume it {how} --fsdp")


def check_global_batch(cfg: TrainConfig, fp: dict, saved: dict) -> None:
    """Under --fsdp the ranks may change on a resume, the global batch (ranks x --grad-accum rank
    micro-batches per step) may not: name the --grad-accum that keeps it."""
    key = "rank_micro_batches_per_step"
    if key not in saved or saved[key] == fp.get(key):
        return
    world = fp[key] // cfg.grad_accum
    fits = f"give --grad-accum {saved[key] // world}" if saved[key] % world == 0 else "use a world size dividing it"
    raise UserError(f"--resume: the run's global batch is {saved[key]} rank micro-batches per step (ranks x "
                    f"--grad-accum); this command has {fp[key]} ({world} ranks x {cfg.grad_accum}): {fits}")


def check_same_run(cfg: TrainConfig, fp: dict, saved: dict, skip: set[str] = frozenset()) -> None:
    """Refuse a resume whose fingerprint differs from the checkpoint's in anything but `skip`."""
    diffs = [_difference(k, saved.get(k), fp.get(k))
             for k in sorted(set(saved) | set(fp)) if k not in skip and saved.get(k) != fp.get(k)]
    if diffs:
        raise UserError(f"--resume: this command differs from the run in {cfg.output}: " + "; ".join(diffs[:8])
                        + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
                        + ". Resume with what the run had, or start afresh with --overwrite (or another --output)")


def probe_shapes(skeleton: torch.nn.Module, name: str) -> None:
    """One forward of the meta-device model on 8 tokens: shapes only, no memory, a few ms. A config whose
    sizes disagree (7 heads for a width of 256, key/value heads that do not divide the heads) builds, and
    would fail only at the first batch, after the weights and the data are loaded."""
    try:
        with torch.no_grad():
            skeleton(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    except NotImplementedError:
        return  # an operation without a meta implementation: the probe cannot tell, the load will
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as err:
        if "meta" in str(err).lower():
            return
        raise unloadable_model(name, err, "its config does not make a working model") from err


def check_vocabulary(cfg: TrainConfig, tokenizer, vocab_size) -> None:
    """Every id the tokenizer can give (pad included) must have a row in the model's embedding; else the
    first batch would index past it."""
    if not isinstance(vocab_size, int):
        return
    largest = max(len(tokenizer) - 1, tokenizer.pad_token_id or 0)
    if largest >= vocab_size:
        raise UserError(f"--model {cfg.model}: the tokenizer gives ids up to {largest:,} (pad id "
                        f"{tokenizer.pad_token_id}), but config.json's vocab_size is {vocab_size:,}; the tokenizer "
                        "does not belong to these weights")


def check_targets(cfg: TrainConfig) -> int | None:
    """Match the targets against the architecture on the meta device: no weights, no memory. Returns the
    config's vocab_size."""
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model_path(cfg.model))
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as err:  # a config.json transformers cannot read or build a model from
        raise unloadable_model(cfg.model, err, "its config does not make a model") from err
    probe_shapes(skeleton, cfg.model)
    known = linear_layer_kinds(skeleton)
    add_lora(skeleton, r=cfg.r, alpha=cfg.alpha, targets=cfg.targets)  # raises UserError if none match
    # The default list names layers of several architectures, each absent from the others; a list the
    # user gave must match in full (a typo would otherwise train fewer layers than asked, silently).
    unknown = [] if cfg.targets == TrainConfig().targets else unmatched_targets(skeleton, cfg.targets)
    if unknown:
        raise UserError(f"--targets {', '.join(unknown)}: no such module in {type(skeleton).__name__} "
                        f"(its linear layers: {', '.join(known)})")
    return getattr(config, "vocab_size", None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, precision: str, device: torch.device, processes: int = 1,
                initial: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """The 4-bit base with LoRA as the run trains it: seeded first, so every rank (and a benchmark that builds
    it the same way) starts from the same LoRA weights; the init (`--init`) computed while the base loads, or
    its base rebuilt from `initial` ({module: (A0, B0)}, a resumed run's); kernel mode and recomputation set.
    `processes`: training processes on this host (they share its memory: `--recompute auto` weighs that).
    Returns (model, {"mode": the recompute mode used, "why": in words, "load_s": seconds to load the base with
    LoRA, init included}), the dict as run.json's `recompute`."""
    seed_everything(cfg.seed)
    started = time.perf_counter()
    lora = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets, use_rslora=cfg.rslora,
                use_dora=cfg.dora, init=cfg.init, initial=initial)
    # --fsdp: each decoder layer and the embeddings sharded as soon as loaded: a rank never holds the whole model
    shard = {}
    if cfg.fsdp:
        sharder = LoadSharder(device, precision, cfg.fsdp_offload)
        shard = dict(on_layer=sharder.on_layer, on_embeddings=sharder.on_embeddings)
    model = load_base(cfg.model, quant=cfg.quant, compute_dtype=COMPUTE_DTYPE[precision], device=device, lora=lora,
                      **shard)
    load_s = time.perf_counter() - started
    set_kernel_mode(model, cfg.kernels)
    use_varlen_attention(model)  # padding-free rows: each example's attention alone, no (T, T) mask
    mode, why = cfg.recompute, f"{cfg.recompute} (--recompute)"
    if mode == "auto":
        mode, why = choose_mode(model, device, max_micro_batch_tokens(cfg), processes, sharded=cfg.fsdp)
    if mode != "none":
        offload = OffloadSaved() if cfg.offload_activations else None
        enable_recompute(model, every=cfg.recompute_every, offload=offload, mode=mode)
    return model, {"mode": mode, "why": why, "load_s": round(load_s, 3)}


def init_record(cfg: TrainConfig) -> dict:
    """run.json's `init`: which initialisation ran, and what the saved adapter is relative to the base."""
    if not changes_base(cfg.init):
        return {"method": cfg.init, "converted": False,
                "base": "the ordinary 4-bit base" if cfg.quant != "none" else "the full-precision base"}
    alpha = cfg.alpha * (2**0.5 if cfg.rslora else 2)
    return {"method": cfg.init, "converted": True, "trained_on": "the base W - scale * B0 A0 (quantized)",
            "saved_r": 2 * cfg.r, "saved_alpha": alpha,
            "base": "the adapter is converted to a plain LoRA of the ordinary base: lora_A = [A; A0], "
                    "lora_B = [B, -B0] (PEFT's path_initial_model_for_weight_conversion)",
            "resume": "the base is rebuilt from W and the initial factors A0, B0 that each checkpoint's converted "
                      "adapter holds"}


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
    own_group = cfg.fsdp and ensure_process_group()  # --fsdp on one rank: a group of one
    # Rank 0 holds --output for the whole run (the other ranks write nothing there).
    lock = FolderLock(Path(cfg.output) / LOCK_NAME, f"--output {cfg.output}") if dist.main else nullcontext()
    try:
        with lock, StopRequest() as stop:  # a signal anywhere in the job stops it at the next safe point
            return _train(cfg, dist, stop)
    finally:
        shutdown(dist)
        if own_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: DistInfo, stop: StopRequest) -> int:
    """One rank's whole job, in the order it runs; returns the exit code.

    cfg   the resolved, validated run configuration (train.py's flags and config file)
    dist  this process's rank and world (torchrun); rank 0 alone writes outputs
    stop  set by SIGINT/SIGTERM (job.run holds the handlers); checked at each safe point

    Checks that need no data (precision, kernels, output folder, targets) -> tokenizer and data (prepared
    or from the cache) -> the run's fingerprint and, with --resume, the checkpoint to continue from ->
    base model + LoRA -> the training loop -> held-out evaluation -> outputs: adapter, run.json, eval.json,
    loss.png, model card, and a summary of where they are. 0 when done; a stop's own code (130, 143, 1)
    when a signal or repeated non-finite steps ended it early.
    """
    started = time.time()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    say = print if dist.main else (lambda *a, **k: None)
    precision = resolve_precision(cfg.precision, device)
    check_kernel_mode(cfg.kernels, device)
    if cfg.fsdp_offload and device.type != "cuda":
        raise UserError("--fsdp-offload moves sharded GPU state to CPU memory; this run is on the CPU, where it all "
                        "is already: leave --fsdp-offload out")
    check_output(cfg)
    vocab_size = check_targets(cfg)  # the model's config and the targets, before the data is read
    tokenizer = load_tokenizer(cfg.model)
    check_vocabulary(cfg, tokenizer, vocab_size)
    data = prepare_data(cfg, tokenizer, dist)
    fp = fingerprint(cfg, data, precision, dist.world)
    resume_from, steered = resume_point(cfg, fp) if cfg.resume else (None, {})
    barrier(dist)  # every rank has checked the output folder before rank 0 changes it
    if dist.main:
        report_data(data, cfg)

    out = Path(cfg.output)
    if dist.main:
        if cfg.overwrite:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
    # A resumed pissa/olora run rebuilds its base from the initial factors in the checkpoint (exact fp32
    # values) rather than by computing them again: an SVD or QR need not repeat bit for bit across thread
    # counts or library versions, the subtraction and quantization of fixed factors do.
    initial = read_initial_factors(resume_from, cfg.r) if resume_from is not None and changes_base(cfg.init) else None
    model, recompute = build_model(cfg, precision, device, dist.local_world, initial)
    if fp["base_files"] is None:  # a hub model downloaded by the load: its files are known only now
        fp["base_files"] = model_file_digests(cfg.model)
        if resume_from is not None:
            check_same_run(cfg, fp, read_manifest(resume_from)["fingerprint"], skip=resume_fields(STEER))
    if dist.enabled:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # but different dropout masks per rank
    say(f"model: {cfg.model} ({cfg.quant}, {precision}) on {hardware(device)}; {trainable_summary(model)}")
    say(f"recompute: {recompute['why']}")
    if cfg.init != "zeros":
        say(f"init: {cfg.init} ({'from the checkpoint' if initial else 'computed'} while the base loaded; base and "
            f"LoRA loaded in {recompute['load_s']:.1f} s)")

    pad_id = tokenizer.pad_token_id
    eval_batches = epoch_batches(data.eval_examples, cfg, 0, pad_id, dist.world)
    trainer = TrainingLoop(model, cfg, train_examples=data.train_examples, eval_batches=eval_batches,
                           pad_id=pad_id, device=device, precision=precision, fingerprint=fp, dist=dist, stop=stop)
    run = {"config": cfg.to_dict(), "precision": precision, "compute_dtype": str(COMPUTE_DTYPE[precision]),
           "double_quant": True, "device": str(device), "hardware": hardware(device), "versions": versions(),
           "architecture": type(model).__name__, "recompute": recompute, "init": init_record(cfg),
           "command": " ".join(sys.argv),
           "world_size": dist.world, "fsdp": cfg.fsdp,
           "data": {"format": data.train.fmt, "n_lines": data.train.n_lines, "sha256": data.train.sha256,
                    "n_train": len(data.train_examples), "n_eval": len(data.eval_examples),
                    "n_train_tokens": data.train_examples.n_tokens,
                    "n_train_target_tokens": data.train_examples.n_targets, "store": data.train.store,
                    "n_truncated": data.train.n_truncated, "n_skipped": len(data.train.skipped),
                    "skipped_lines": [line for line, _ in data.train.skipped], "eval_source": data.eval_source}}
    # Each rank's bytes of the 4-bit base (packed codes + statistics), sharded under --fsdp, and the unsharded
    # total: what benchmarks/fsdp_run.py compares across configurations. Collective.
    held = base_bytes(model)
    run["base_bytes"] = {"ranks": gather_objects(held.local, dist), "whole": held.whole}
    if resume_from is not None:
        trainer.restore(resume_from)
        say(f"resume: continuing from {resume_from} (step {trainer.state.step}/{trainer.total})")
        earlier = (read_run_record(out) or {}).get("resumes", [])
        run["resumes"] = [*earlier, {"step": trainer.state.step, "changed": steered}]
    if dist.main:
        write_run_record(out, run)

    try:
        state = trainer.run()
        eval_after = trainer.run_eval("after")  # collective: every rank evaluates its share
        trainer.check_weights(f"the adapter in {out}")  # nothing non-finite is written as the result
    except TrainingStopped as stop:
        if dist.main:
            plot_run(out, f"{cfg.model} (stopped)")
            print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code

    trainer.save_adapter(out)  # collective under --fsdp
    if not dist.main:
        return 0
    trainable, total = count_parameters(model)
    times, tokens = trainer.state.step_times[1:] or trainer.state.step_times, trainer.state.step_tokens
    tokens_per_s = sum(tokens[-len(times):]) / max(sum(times), 1e-9) if times else 0.0
    run["result"] = {
        "steps": state.step, "warmup_steps": trainer.warmup, "epochs_done": trainer.stream.epochs_done(),
        "eval_before": state.eval_before, "eval_after": eval_after, "skipped_steps": state.skipped_steps,
        "trainable": trainable, "total_params": total, "trainable_share": f"{100 * trainable / total:.2f}%",
        "trainable_summary": trainable_summary(model), "target_modules": matched_target_names(model),
        "tokens_per_s": tokens_per_s, "wall_time_s": time.time() - started,
        "peak_mem_mb": max((m.get("peak_mem_mb", 0) for m in read_metrics(out / METRICS_NAME)), default=0),
    }
    write_run_record(out, run)
    atomic_write_json(out / "eval.json", {"before": state.eval_before, "after": eval_after,
                                          "held_out": data.eval_source, "n_examples": len(data.eval_examples)})
    plot_run(out, f"LoRA r={cfg.r} on {cfg.model}")
    atomic_write_text(out / "README.md", render_card(run, str(out)))
    print_summary(cfg, run)
    if stop.signal_name:
        print(f"{stop.signal_name} came after the last step: all {state.step} steps are done and every output is "
              "written", file=sys.stderr)
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
