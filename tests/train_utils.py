"""Helpers for tests that train on the built-in tiny model and the demo data: whole runs, and one
loss + backward (the oracle the recompute, offload and chunked-loss tests compare against)."""

from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM

import minilora
from minilora.builtin import build_config, build_tokenizer
from minilora.data.batching import make_batches
from minilora.data.dataset import load_dataset
from minilora.training.config import TrainConfig, validate
from minilora.training.job import train_from_config
from minilora.training.loss import loss_sum
from minilora.training.recompute import enable_recompute

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.jsonl"

# Small and quick: ~0.1-0.3 s per optimizer step on 2 CPU cores.
QUICK = dict(data=str(DEMO), model="builtin:tiny-phi3", batch_size=4, grad_accum=2, seq_len=128, max_steps=6,
             eval_every=3, save_every=3, lr=1e-3, warmup_steps=2)


def save_small_chat_model(folder) -> str:
    """builtin:tiny-phi3's tokenizer and chat format on a smaller Phi-3 (hidden 64, MLP 128, 2 layers): for
    runs whose cost grows with the model, such as the kernels in Triton's interpreter. Every projection's
    input size is a multiple of 64, so each one takes the fused kernels. Returns the folder."""
    tokenizer = build_tokenizer()
    config = Phi3Config(**{**build_config(tokenizer).to_dict(), "hidden_size": 64, "intermediate_size": 128,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4})
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def quick_config(output, **overrides) -> TrainConfig:
    cfg = TrainConfig(**{**QUICK, "output": str(output), **overrides})
    validate(cfg)
    return cfg


def run_quick(output, **overrides) -> int:
    return train_from_config(quick_config(output, **overrides))


def argv_for(output, data, *extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items() if k != "data"]
    return ["--data", str(data), "--output", str(output), *flags, *extra]


def demo_batch(n=4):
    tokenizer = build_tokenizer()
    return make_batches(load_dataset(DEMO, tokenizer, 128).examples[:n], n, 0, 0, tokenizer.pad_token_id)[0]


def lora_grads(batch, every=None, chunk_rows=2048, offload=None):
    torch.manual_seed(0)
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model, dropout=0.05)
    with torch.no_grad():
        for p in minilora.lora_parameters(model):
            p.normal_(0, 0.05)
    wrapped = enable_recompute(model, every=every, offload=offload) if every else 0
    model.train()
    torch.manual_seed(1)
    loss = loss_sum(model, batch, chunk_rows=chunk_rows)
    loss.backward()
    return wrapped, [loss.detach()] + [p.grad for p in minilora.lora_parameters(model)]
