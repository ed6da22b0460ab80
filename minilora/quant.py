"""Load a causal LM with its linear layers as bitsandbytes 4-bit layers (QLoRA's frozen base).

NF4 with double quantization and a bf16 compute dtype is QLoRA's recipe (Dettmers et al. 2023);
bitsandbytes and transformers default to fp4, no double quant and fp32 compute, so all three are
set explicitly. Norms, embeddings and lm_head stay in the compute dtype: unlike PEFT's
`prepare_model_for_kbit_training` we do not upcast them to fp32, which costs memory and speed.
"""

from pathlib import Path

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .errors import UserError

QUANT_TYPES = ("nf4", "fp4", "none")
BUILTIN_PREFIX = "builtin:"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:<name>` -> the folder of the built-in demo model; anything else unchanged."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        from .builtin import resolve_builtin

        return str(resolve_builtin(name_or_path[len(BUILTIN_PREFIX):]))
    return name_or_path


def load_base(
    name_or_path: str,
    quant: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """A frozen causal LM whose linear layers (all but lm_head) are bnb `Linear4bit` (or plain, with
    quant="none"). `name_or_path`: a hub id, a local folder, or `builtin:tiny-phi3`."""
    if quant not in QUANT_TYPES:
        raise UserError(f"quant={quant!r}: expected one of {', '.join(QUANT_TYPES)}")
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": compute_dtype, "device_map": {"": device}}
    if quant != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}") from err
    if name_or_path.startswith(BUILTIN_PREFIX):
        model.config._name_or_path = name_or_path
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place during a no-grad
            # eval forward into a CPU-only layout with bf16 absmax. That changes the numbers between
            # eval and training and the bytes our kernels read; keep the standard layout.
            module.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    model.config.use_cache = False  # training never decodes; the KV cache only costs memory
    return model


def load_tokenizer(name_or_path: str):
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise UserError(f"cannot load the tokenizer of {name_or_path!r}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id serves; eos is always there.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_local_model(name_or_path: str) -> bool:
    return name_or_path.startswith(BUILTIN_PREFIX) or Path(name_or_path).exists()
