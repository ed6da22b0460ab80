"""The default recipe and the named choices the command lines offer. No torch here: `train.py --help`
reads these without importing torch, transformers or bitsandbytes.

The recipe (rank 8, alpha 16, dropout 0.05, NF4, the target list) is the one in the model card of
https://github.com/amit-chaubey/finetune-LoRA-4bit, a LoRA adapter of microsoft/Phi-3-mini-4k-instruct.
"""

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_R = 8
DEFAULT_ALPHA = 16.0
DEFAULT_DROPOUT = 0.05
# That card's target list: Phi-3's fused projections (qkv_proj, gate_up_proj), the o_proj and down_proj
# that Llama, Mistral and Qwen2 share, and GPT-NeoX's fused attention input. Names a model lacks are skipped.
DEFAULT_TARGETS = ("query_key_value", "o_proj", "qkv_proj", "gate_up_proj", "down_proj")

QUANT_TYPES = ("nf4", "fp4", "none")  # how the frozen base is stored; none: full precision
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
KERNEL_MODES = ("auto", "triton", "torch")
# What a recomputed decoder layer keeps for backward (see minilora.training.recompute); none: no recompute;
# auto: decided per run from the device and the memory the activations need
RECOMPUTE_MODES = ("auto", "selective", "full", "none")

# How LoRA starts (minilora/lora_init.py): zeros is QLoRA's and PEFT's default (A random, B = 0); the others
# are computed from each full-precision weight while the base loads; pissa:N and loftq:N use a randomized SVD.
INITS = ("zeros", "loftq", "pissa", "olora")
BASE_CHANGING_INITS = ("pissa", "olora")  # they quantize W - scale · B0 A0, so their adapters are converted
RANDOMIZED_INITS = ("pissa", "loftq")  # their SVD can come from torch.svd_lowrank: `pissa:N`, `loftq:N`


def parse_init(init: str) -> tuple[str, int | None]:
    """("pissa", None), ("pissa", 4) for "pissa:4", ("loftq", 2) for "loftq:2", ...; ValueError for anything else."""
    method, colon, niter = init.partition(":")
    if method not in INITS:
        raise ValueError(f"init {init!r}: expected one of {', '.join(INITS)} (or pissa:N, loftq:N)")
    if not colon:
        return method, None
    if method not in RANDOMIZED_INITS or not niter.isdigit():
        raise ValueError(f"init {init!r}: only pissa and loftq take a count of randomized-SVD iterations "
                         "(pissa:N, loftq:N, N >= 0)")
    return method, int(niter)


# Upper bounds of the LoRA settings, for train's flags and for adapter configs read from anywhere: past
# them a value is a mistake (or hostile) and would only allocate without bound or overflow. A rank is at
# most a layer's width (Phi-3-mini: 3,072; the widest open models: ~16k); a scale alpha/r beyond ~1e6
# overflows bf16/fp16 activations.
MAX_R = 65_536
MAX_ALPHA = 1e6
