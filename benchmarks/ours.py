"""minilora as `train.py` runs it, for the benchmarks that measure it: the model built in the job's order
(kernel mode, seed, minilora.load_base, add_lora, enable_recompute) and minilora.training.loop.TrainingLoop
constructed as minilora.training.job constructs it, from a TrainConfig the benchmark fills in from its recipe.
The benchmark then calls `loop.train_step()` itself, step by step: the product's step, timed from outside.

Imported inside a system's process only (benchmarks.train_systems, benchmarks.levers): its library imports
belong to the measured time to first step.
"""

from pathlib import Path

import torch

from minilora import add_lora, load_base, save_adapter, set_kernel_mode
from minilora.training.config import TrainConfig
from minilora.training.loop import TrainingLoop
from minilora.training.offload import OffloadSaved
from minilora.training.recompute import enable_recompute

COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
CODE_PATH = ("minilora.training.loop.TrainingLoop.train_step (TrainConfig from the benchmark's recipe; "
             "model: minilora.load_base + add_lora + enable_recompute, as minilora.training.job builds it)")


def build_model(cfg: TrainConfig, device: torch.device, precision: str, init_dir: str | None = None):
    """The 4-bit base with LoRA, as the job builds it; `init_dir` gets the initial adapter (for references
    that must start from the same LoRA weights)."""
    torch.manual_seed(cfg.seed)  # the job seeds before loading: this fixes the LoRA init
    model = load_base(cfg.model, quant=cfg.quant, compute_dtype=COMPUTE_DTYPE[precision], device=device)
    add_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets, use_rslora=cfg.rslora)
    set_kernel_mode(model, cfg.kernels)
    if init_dir is not None:
        save_adapter(model, init_dir)
    if cfg.grad_checkpointing:
        enable_recompute(model, every=cfg.checkpoint_every,
                         offload=OffloadSaved() if cfg.offload_activations else None)
    return model


def build_loop(model, cfg: TrainConfig, examples: list, device: torch.device, precision: str,
               pad_id: int) -> TrainingLoop:
    """The job's TrainingLoop over `examples`, without evaluation; its metrics.jsonl goes to cfg.output."""
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    loop = TrainingLoop(model, cfg, examples, [], pad_id, device, precision, {"benchmark": cfg.to_dict()})
    model.train()  # as TrainingLoop.run() does before its first step
    return loop


def replay_last_batch(loop: TrainingLoop) -> dict:
    """One more optimizer step on the first epoch's last batch: an extra (profiled) step on data already
    trained on, without building the next epoch's batches inside it."""
    loop.stream.epoch, loop.stream.index = 0, len(loop.stream.batches(0)) - 1
    return loop.train_step()
