"""Helpers for tests that run the training loop on the built-in tiny model and the demo data."""

from pathlib import Path

from minilora.training.config import TrainConfig, validate
from minilora.training.job import train_from_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.jsonl"

# Small and quick: ~0.1-0.3 s per optimizer step on 2 CPU cores.
QUICK = dict(data=str(DEMO), model="builtin:tiny-phi3", batch_size=4, grad_accum=2, seq_len=128, max_steps=6,
             eval_every=3, save_every=3, lr=1e-3, warmup_steps=2)


def quick_config(output, **overrides) -> TrainConfig:
    cfg = TrainConfig(**{**QUICK, "output": str(output), **overrides})
    validate(cfg)
    return cfg


def run_quick(output, **overrides) -> int:
    return train_from_config(quick_config(output, **overrides))
