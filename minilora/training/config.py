"""The training run's settings: one dataclass, the single source of the CLI flags and config files.

Each field's default carries its reason; `train.py --help` shows the `help` text of each. The
resolved config is saved in `run.json` and in every checkpoint, and `--resume` compares against it.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from minilora.errors import UserError
from minilora.inject import DEFAULT_TARGETS


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    data: str = _f("", "training data, JSONL (alpaca, chat `messages`, prompt/completion or text)")
    model: str = _f("microsoft/Phi-3-mini-4k-instruct",
                    "base model: hub id, local folder, or builtin:tiny-phi3 (offline demo)")
    output: str = _f("out", "output folder: adapter, metrics, checkpoints, model card")
    # LoRA: the seed card's recipe
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha; scale = alpha / r")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    targets: list[str] = _f(list(DEFAULT_TARGETS), "module names to adapt (exact or .suffix match); absent ones skip")
    rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(r)")
    quant: str = _f("nf4", "base weights: nf4 (QLoRA), fp4, or none (full precision)", choices=("nf4", "fp4", "none"))
    # schedule
    epochs: float = _f(1.0, "passes over the training data (fractions allowed)")
    max_steps: int = _f(0, "stop after this many optimizer steps (0: set by --epochs)")
    batch_size: int = _f(4, "examples per micro-batch (with padding-free batching: at most this many)")
    batch_tokens: int = _f(0, "padding-free batching: at most this many tokens per micro-batch and rank; a "
                              "micro-batch takes examples in epoch order until either limit (0: --batch-size x "
                              "--seq-len, so --batch-size alone decides)")
    grad_accum: int = _f(4, "micro-batches per optimizer step (loss normalised by target tokens)")
    lr: float = _f(2e-4, "peak learning rate (QLoRA's value for 7B-scale models)")
    warmup_steps: int = _f(10, "linear warm-up steps before cosine decay")
    min_lr_ratio: float = _f(0.1, "cosine decays to lr * this")
    weight_decay: float = _f(0.0, "AdamW weight decay on LoRA weights")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    seq_len: int = _f(2048, "longest sequence in tokens; longer examples are truncated")
    packing: bool = _f(False, "pack short examples into full sequences (no attention across examples)")
    padding: bool = _f(False, "pad each micro-batch's examples to its longest (the reference recipe's layout) "
                              "instead of laying them back to back without padding (the default)")
    # evaluation and checkpoints
    eval_fraction: float = _f(0.05, "share of the data held out for evaluation")
    eval_file: str = _f("", "held-out data file (instead of --eval-fraction)")
    eval_every: int = _f(50, "evaluate every N optimizer steps (and before and after training)")
    save_every: int = _f(100, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output")
    overwrite: bool = _f(False, "start afresh in an --output that holds another run (its files are replaced)")
    # numerics and speed
    seed: int = _f(42, "seed for LoRA init, data order, dropout")
    precision: str = _f("auto", "auto: bf16 on GPUs that support it, else fp16 (with a grad scaler); fp32 on CPU",
                        choices=("auto", "bf16", "fp16", "fp32"))
    recompute: str = _f("selective", "activation recompute in backward, per decoder layer: selective (keep matrix "
                        "products and attention, recompute the element-wise rest), full (keep only the layer "
                        "input: least memory), none (keep everything: most memory)",
                        choices=("selective", "full", "none"))
    checkpoint_every: int = _f(1, "recompute every K-th decoder layer only (1: all; larger: faster, more memory)")
    offload_activations: bool = _f(False, "keep checkpointed layer inputs in pinned CPU memory (CUDA)")
    optim: str = _f("adamw", "optimizer: adamw, or bitsandbytes' adamw8bit / paged_adamw8bit (less state memory)",
                    choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    kernels: str = _f("auto", "LoRA layer path: auto (Triton on CUDA where supported), triton, torch",
                      choices=("auto", "triton", "torch"))
    skip_bad_lines: bool = _f(False, "skip (and report) malformed data lines instead of stopping")
    max_bad_steps: int = _f(5, "stop after this many consecutive non-finite steps")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: TrainConfig, explicit: set[str] = frozenset()) -> None:
    """Reject bad or contradictory settings with one clear line, before any model is loaded."""

    def bad(flag: str, why: str):
        raise UserError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: {why}")

    if not cfg.data:
        raise UserError("--data is required (a JSONL file)")
    if cfg.r < 1:
        bad("r", "the LoRA rank must be at least 1")
    if not cfg.alpha > 0:
        bad("alpha", "must be positive")
    if not 0 <= cfg.dropout < 1:
        bad("dropout", "must be in [0, 1)")
    if not cfg.targets:
        bad("targets", "name at least one module")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        bad("lr", "the learning rate must be positive")
    if not cfg.epochs > 0:
        bad("epochs", "must be positive")
    for name in ("batch_size", "grad_accum", "keep_checkpoints", "max_bad_steps", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            bad(name, "must be at least 1")
    for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "batch_tokens"):
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
    if cfg.eval_file and "eval_fraction" in explicit and cfg.eval_fraction > 0:
        raise UserError("--eval-file and --eval-fraction both choose the held-out data; give one of them")
    if cfg.padding and cfg.packing:
        raise UserError("--padding and --packing choose different batch layouts; give one of them")
    if cfg.offload_activations and cfg.recompute != "full":
        raise UserError("--offload-activations moves the layer inputs that --recompute full keeps; "
                        "add --recompute full")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --output and --overwrite replaces it; give one of them")
    for name in ("data", "eval_file"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise UserError(f"{path}: no such file (--{name.replace('_', '-')})")
