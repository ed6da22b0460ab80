"""What the training benchmark's three systems share: the model configurations, the recipe, the synthetic
data, the model-FLOPs formula, and the random-weight base model they all load from disk.

Used by the parent (benchmarks.throughput) and by each system's process (benchmarks.throughput_systems). Imports only
torch and the standard library at the top: a system's library imports belong to its measured time to first
step.
"""

import gc
import hashlib
import json
import tempfile
from pathlib import Path

import torch

SYSTEMS = ("ours", "ref_loop", "trainer")
REFERENCES = ("ref_loop", "trainer")

# Phi-3-mini-4k-instruct's architecture, as in its config.json
# (https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json).
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

# The LoRA recipe of https://github.com/amit-chaubey/finetune-LoRA-4bit (r 8, alpha 16, dropout 0.05). The lr
# is constant (no warm-up, no decay) in all three systems, so the schedule implementations cannot differ; it
# is high enough that the loss visibly moves within a few steps.
LORA = dict(r=8, alpha=16, dropout=0.05)
LR, MAX_GRAD_NORM, SEED = 1e-3, 1.0, 0
# bf16 dense tensor-core peak, FLOP/s (NVIDIA datasheets: the "with sparsity" figures halved). First
# substring of the device name that matches wins, so the more specific names come first.
PEAK_FLOPS = [("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
              ("H100", 989e12), ("A100", 312e12)]
FLOPS_FORMULA = ("model FLOPs/token = 6*N + 8*L*T*d. N = weights of every linear layer incl. lm_head "
                 "(embeddings excluded); 6N = forward 2N + recompute 2N + input-gradient 2N (the 4-bit base "
                 "gets no weight gradient; LoRA's own FLOPs are ignored). Attention: QK^T and AV cost "
                 "2*T*d per token per layer over the causal half, times 4 (forward, recompute, backward 2x) "
                 "= 8*L*T*d. L layers, T sequence length, d hidden size. MFU = tokens/s * FLOPs/token / "
                 "peak (bf16 dense).")


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


def synthetic_examples(spec: dict) -> list:
    """The run's training examples: steps x batch rows of `synthetic_tokens`, one epoch of exactly `steps`
    batches, every token a target."""
    tokens = synthetic_tokens(spec["vocab"], spec["seq"], spec["batch"], spec["steps"], spec["seed"])
    return examples_from_tokens(tokens.view(-1, spec["seq"]))


def examples_from_tokens(tokens: torch.Tensor) -> list:
    """(n, T) token ids -> n minilora training examples with every token a target (labels = input ids)."""
    from minilora.data.examples import Example

    return [Example(input_ids=row.tolist(), labels=row.tolist(), line=i + 1) for i, row in enumerate(tokens)]


def batches_digest(batches) -> str:
    """sha256 of the batches' input ids and labels in training order: equal digests, equal data."""
    h = hashlib.sha256()
    for batch in batches:
        for t in (batch.input_ids, batch.labels):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
