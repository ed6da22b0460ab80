"""minilora as `train.py` runs it, for the benchmarks that measure it: the model built by the job's own
`minilora.training.job.build_model` (seed, load_base, add_lora, kernel mode, recompute) and
minilora.training.loop.TrainingLoop constructed as minilora.training.job constructs it, from a TrainConfig the
benchmark fills in from its recipe.
The benchmark then calls `loop.train_step()` itself, step by step: the product's step, timed from outside.

Imported inside a system's process only (benchmarks.throughput_systems, benchmarks.levers): its library imports
belong to the measured time to first step.
"""

from pathlib import Path

import torch

from minilora import save_adapter
from minilora.training import job
from minilora.training.config import TrainConfig
from minilora.training.loop import TrainingLoop

CODE_PATH = ("minilora.training.loop.TrainingLoop.train_step (TrainConfig from the benchmark's recipe; "
             "model: minilora.training.job.build_model)")


def build_model(cfg: TrainConfig, device: torch.device, precision: str, init_dir: str | None = None):
    """The 4-bit base with LoRA, built by the job's own `build_model`; `init_dir` gets the initial adapter (for
    references that must start from the same LoRA weights)."""
    model, _ = job.build_model(cfg, precision, device)
    if init_dir is not None:
        save_adapter(model, init_dir)
    return model


def build_loop(model, cfg: TrainConfig, examples: list, device: torch.device, precision: str,
               pad_id: int) -> TrainingLoop:
    """The job's TrainingLoop over `examples`, without evaluation; its metrics.jsonl goes to cfg.output."""
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    loop = TrainingLoop(model, cfg, train_examples=examples, eval_batches=[], pad_id=pad_id, device=device,
                        precision=precision, fingerprint={"benchmark": cfg.to_dict()})
    model.train()  # as TrainingLoop.run() does before its first step
    return loop


def replay_last_batch(loop: TrainingLoop) -> dict:
    """One more optimizer step on the first epoch's last batch: an extra (profiled) step on data already
    trained on, without building the next epoch's batches inside it."""
    loop.stream.epoch, loop.stream.index = 0, len(loop.stream.batches(0)) - 1
    return loop.train_step()
