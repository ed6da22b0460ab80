"""The training run's settings: one dataclass, the single source of the CLI flags and config files.

Each field's default carries its reason; `train.py --help` shows the `help` text of each. The
resolved config is saved in `run.json` and in every checkpoint, and `--resume` compares against it.
Fields marked `resume=FREE` change how the run is carried out or recorded, not what it computes: they
may differ on a resume. Fields marked `resume=STEER` steer the rest of the run (learning rate and
schedule, length, clipping): they may differ too, with a notice recorded in run.json and the card.
All others define what the model sees or is, and a resume must repeat them. No torch here:
`train.py --help` imports this module.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from minilora import recipe
from minilora.errors import UserError, shown

FREE = "free"  # `resume=FREE`: may differ on --resume (the run computes the same numbers)
STEER = "steer"  # `resume=STEER`: may differ on --resume, with a notice (the rest of the run changes)


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    data: str = _f("", "training data, JSONL (alpaca, chat `messages`, prompt/completion or text)")
    model: str = _f(recipe.DEFAULT_MODEL, "base model: hub id, local folder, or builtin:tiny-phi3 (offline demo)")
    output: str = _f("out", "output folder: adapter, metrics, checkpoints, model card", resume=FREE)
    # LoRA: the recipe of minilora.recipe
    r: int = _f(recipe.DEFAULT_R, "LoRA rank")
    alpha: float = _f(recipe.DEFAULT_ALPHA, "LoRA alpha; scale = alpha / r")
    dropout: float = _f(recipe.DEFAULT_DROPOUT, "dropout on the LoRA input")
    targets: list[str] = _f(list(recipe.DEFAULT_TARGETS),
                            "module names to adapt (exact or .suffix match); absent ones skip")
    rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(r)")
    init: str = _f("zeros", "LoRA initialisation, computed from the full-precision weights as the base loads: "
                            "zeros (QLoRA: B = 0), loftq (B A fits the 4-bit quantization error), pissa (the "
                            "top-r singular part of W), olora (QR); pissa:N, loftq:N: randomized SVD, N "
                            "iterations, for large layers; "
                            "pissa and olora quantize W - scale * B A and save the adapter converted to a "
                            "rank-2r LoRA of the ordinary base")
    # research variants and statistics (Studying LoRA in the README)
    dora: bool = _f(False, "DoRA: learn a per-row magnitude over the (dequantized) base + LoRA direction")
    lora_plus_ratio: float = _f(1.0, "LoRA+: B's learning rate = this x A's (1: plain LoRA)")
    log_lora_stats: int = _f(0, "every N steps, log per-module update and gradient norms (0: off)", resume=FREE)
    quant: str = _f("nf4", "base weights: nf4 (QLoRA), fp4, or none (full precision)", choices=recipe.QUANT_TYPES)
    # schedule
    epochs: float = _f(1.0, "passes over the training data (fractions allowed)", resume=STEER)
    max_steps: int = _f(0, "stop after this many optimizer steps (0: set by --epochs)", resume=STEER)
    batch_size: int = _f(4, "examples per micro-batch (with padding-free batching: at most this many)")
    batch_tokens: int = _f(0, "padding-free batching: at most this many tokens per micro-batch and rank; a "
                              "micro-batch takes examples in epoch order until either limit (0: --batch-size x "
                              "--seq-len, so --batch-size alone decides)")
    grad_accum: int = _f(4, "micro-batches per optimizer step (loss normalised by target tokens)")
    lr: float = _f(2e-4, "peak learning rate (QLoRA's value for 7B-scale models)", resume=STEER)
    warmup_steps: int = _f(10, "linear warm-up steps before cosine decay", resume=STEER)
    min_lr_ratio: float = _f(0.1, "cosine decays to lr * this", resume=STEER)
    weight_decay: float = _f(0.0, "AdamW weight decay on LoRA weights", resume=STEER)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", resume=STEER)
    seq_len: int = _f(2048, "longest sequence in tokens; longer examples are truncated")
    packing: bool = _f(False, "pack short examples into full sequences (no attention across examples)")
    padding: bool = _f(False, "pad each micro-batch's examples to its longest (the reference recipe's layout) "
                              "instead of laying them back to back without padding (the default)")
    # evaluation and checkpoints
    eval_fraction: float = _f(0.05, "share of the data held out for evaluation")
    eval_file: str = _f("", "held-out data file (instead of --eval-fraction)")
    eval_max_examples: int = _f(1000, "at most this many held-out examples (a seeded sample; 0: no cap)")
    data_cache: str = _f("", "folder for prepared (tokenized) data; default $MINILORA_CACHE/data, "
                             "else ~/.cache/minilora/data", resume=FREE)
    eval_every: int = _f(50, "evaluate every N optimizer steps (and before and after training)", resume=FREE)
    save_every: int = _f(100, "write a checkpoint every N optimizer steps (0: only at the end)", resume=FREE)
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep", resume=FREE)
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output", resume=FREE)
    overwrite: bool = _f(False, "start afresh in an --output that holds another run (its files are replaced)",
                         resume=FREE)
    # numerics and speed
    seed: int = _f(42, "seed for LoRA init, data order, dropout")
    precision: str = _f("auto", "auto: bf16 on GPUs that support it, else fp16 (with a grad scaler); fp32 on CPU",
                        choices=recipe.PRECISIONS)
    recompute: str = _f("auto", "what a recomputed decoder layer keeps for backward: selective (matrix "
                        "products and attention; the element-wise rest is recomputed), full (only its input: "
                        "least memory), none (no recompute: everything kept, most memory, fastest); auto: "
                        "selective on a GPU, on a CPU none if the activations fit in half the free memory, "
                        "else full",
                        choices=recipe.RECOMPUTE_MODES, resume=FREE)
    recompute_every: int = _f(1, "with --recompute selective or full, recompute every K-th decoder layer only "
                                 "(1: every layer, least memory; larger: faster, more memory)", resume=FREE)
    offload_activations: bool = _f(False, "keep recomputed layers' inputs in pinned CPU memory (CUDA; with "
                                          "--recompute full)", resume=FREE)
    optim: str = _f("adamw", "optimizer: adamw, or bitsandbytes' adamw8bit / paged_adamw8bit (less state memory)",
                    choices=recipe.OPTIMIZERS)
    kernels: str = _f("auto", "LoRA layer path: auto (Triton on CUDA where supported), triton, torch",
                      choices=recipe.KERNEL_MODES, resume=FREE)
    # several GPUs (torchrun): DDP unless --fsdp; a resume keeps the checkpoint's kind
    fsdp: bool = _f(False, "with torchrun: shard the LoRA weights, their AdamW state and a full-precision base over "
                           "the ranks (FSDP2) instead of replicating them (DDP); checkpoints are sharded")
    fsdp_offload: bool = _f(False, "with --fsdp: keep the sharded parameters, gradients and optimizer state in CPU "
                                   "memory (FSDP2's CPUOffloadPolicy; slower, less GPU memory)", resume=FREE)
    skip_bad_lines: bool = _f(False, "skip (and report) malformed data lines instead of stopping", resume=FREE)
    max_bad_steps: int = _f(5, "stop after this many consecutive non-finite steps", resume=FREE)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The largest value of each numeric setting, checked before anything is allocated: past these a value is a
# mistake (or hostile), and some would allocate without bound (a step holds its --grad-accum micro-batches;
# --seq-len x --batch-size sizes the recompute probe). Lower bounds are checked in `validate`.
UPPER_BOUNDS = {
    "r": recipe.MAX_R, "alpha": recipe.MAX_ALPHA,
    "dropout": 1.0, "eval_fraction": 1.0, "min_lr_ratio": 1.0,  # ranges with their own messages below
    "lora_plus_ratio": 1e4,  # LoRA+ reports ratios of 2 to 2**8 (Hayou et al. 2024)
    "lr": 1.0,  # AdamW's step is about lr per weight: past 1 an update outweighs any LoRA weight
    "weight_decay": 1e3, "max_grad_norm": 1e6, "epochs": 1e6,
    "max_steps": 10**9, "warmup_steps": 10**9,
    "batch_size": 65_536, "grad_accum": 1_024, "seq_len": 1 << 20, "batch_tokens": 1 << 24,
    "eval_max_examples": 10**9, "eval_every": 10**9, "save_every": 10**9, "keep_checkpoints": 10**6,
    "log_lora_stats": 10**9, "seed": 2**32 - 1, "recompute_every": 10**6, "max_bad_steps": 10**6,
}


def resume_fields(kind: str) -> set[str]:
    """The fields marked `resume=kind` (FREE or STEER)."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume") == kind}


def validate(cfg: TrainConfig, explicit: set[str] = frozenset()) -> None:
    """Reject bad or contradictory settings with one clear line, before any model is loaded."""

    def bad(flag: str, why: str):
        raise UserError(f"--{flag.replace('_', '-')} {shown(getattr(cfg, flag))}: {why}")

    if not cfg.data:
        raise UserError("--data is required (a JSONL file)")
    for f in dataclasses.fields(TrainConfig):
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            bad(f.name, "must be a finite number")
    if not 0 <= cfg.seed < 2**32:
        bad("seed", "must be in [0, 2**32)")  # what NumPy's seeding accepts
    if cfg.r < 1:
        bad("r", "the LoRA rank must be at least 1")
    if not cfg.alpha > 0:
        bad("alpha", "must be positive")
    if not 0 <= cfg.dropout < 1:
        bad("dropout", "must be in [0, 1)")
    if not cfg.targets:
        bad("targets", "name at least one module")
    try:
        method, _ = recipe.parse_init(cfg.init)
    except ValueError as err:
        raise UserError(f"--init: {err}") from None
    if method != "zeros" and cfg.dora:
        raise UserError(f"--init {cfg.init} with --dora is not supported (DoRA's magnitude starts from the base's "
                        "row norms); use --init zeros with --dora")
    if method == "loftq" and cfg.quant == "none":
        raise UserError("--init loftq fits the adapter to the 4-bit quantization error; --quant none has none")
    if not (cfg.lora_plus_ratio > 0 and math.isfinite(cfg.lora_plus_ratio)):
        bad("lora_plus_ratio", "must be positive (1: plain LoRA)")
    if cfg.log_lora_stats < 0:
        bad("log_lora_stats", "must not be negative")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad("lr", "the learning rate must be positive")
    if not cfg.epochs > 0:
        bad("epochs", "must be positive")
    for name in ("batch_size", "grad_accum", "keep_checkpoints", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            bad(name, "must be at least 1")
    if cfg.recompute_every < 1:
        bad("recompute_every", "must be at least 1 (for no recompute give --recompute none)")
    for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "batch_tokens", "eval_max_examples"):
        if getattr(cfg, name) < 0:
            bad(name, "must not be negative")
    if cfg.seq_len < 8:
        bad("seq_len", "must be at least 8 tokens")
    if not 0 <= cfg.eval_fraction < 1:
        bad("eval_fraction", "the held-out share must be in [0, 1)")
    if not 0 <= cfg.min_lr_ratio <= 1:
        bad("min_lr_ratio", "must be in [0, 1]")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise UserError("--weight-decay and --max-grad-norm must not be negative")
    for name, most in UPPER_BOUNDS.items():  # after the checks above, which give their own messages
        if getattr(cfg, name) > most:
            bad(name, f"must be at most {most:,}" if isinstance(most, int) else f"must be at most {most:g}")
    if cfg.eval_file and "eval_fraction" in explicit and cfg.eval_fraction > 0:
        raise UserError("--eval-file and --eval-fraction both choose the held-out data; give one of them")
    if cfg.padding and cfg.packing:
        raise UserError("--padding and --packing choose different batch layouts; give one of them")
    if cfg.offload_activations and cfg.recompute != "full":
        raise UserError("--offload-activations moves the layer inputs that --recompute full keeps; "
                        "add --recompute full")
    if cfg.fsdp_offload and not cfg.fsdp:
        raise UserError("--fsdp-offload moves what --fsdp shards to CPU memory; add --fsdp")
    if cfg.fsdp and cfg.optim != "adamw":
        raise UserError(f"--optim {cfg.optim} with --fsdp: bitsandbytes' 8-bit optimizers cannot update sharded "
                        "(DTensor) weights; use --optim adamw (its state is sharded with the weights)")
    if cfg.fsdp and cfg.log_lora_stats:
        raise UserError("--log-lora-stats with --fsdp is not supported (per-module norms of sharded weights); "
                        "leave it out or train without --fsdp")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --output and --overwrite replaces it; give one of them")
    for name in ("data", "eval_file"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise UserError(f"{path}: no such file (--{name.replace('_', '-')})")
