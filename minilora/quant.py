"""Load a causal LM with its linear layers as bitsandbytes 4-bit layers (QLoRA's frozen base).

NF4 with double quantization and a bf16 compute dtype is QLoRA's recipe (Dettmers et al. 2023);
bitsandbytes and transformers default to fp4, no double quant and fp32 compute, so all three are
set explicitly. The quantization is ours (quantize_linear): minilora/stream_load.py reads the checkpoint tensor
by tensor, and bitsandbytes packs each linear layer's weight as it moves to the device. Norms, embeddings and
lm_head stay in the compute dtype: unlike PEFT's `prepare_model_for_kbit_training` we do not upcast
them to fp32, which costs memory and speed.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from minilora.errors import UserError
from minilora.model_files import BUILTIN_PREFIX, resolve_model_path, unloadable_model
from minilora.recipe import QUANT_TYPES
from minilora.stream_load import embeddings_tied, load_streaming


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantize_linear(linear: nn.Linear, quant: str, double_quant: bool, compute_dtype: torch.dtype,
                    device: torch.device, weight: torch.Tensor | None = None) -> bnb.nn.Linear4bit:
    """A bnb Linear4bit on `device` holding `linear`'s weight (or `weight` [out, in], e.g. a residual that a
    LoRA init leaves) in 4 bits, and its bias in the compute dtype."""
    weight = linear.weight.data if weight is None else weight
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant,
                              quant_storage=torch.uint8, device="meta")
    # bitsandbytes quantizes a Params4bit when it first moves to a device (blocks of 64 weights).
    packed = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, blocksize=64,
                               compress_statistics=double_quant, quant_type=quant, quant_storage=torch.uint8)
    layer.weight = packed.to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place during a no-grad eval
    # forward into a CPU-only layout with bf16 absmax. That changes the numbers between eval and
    # training and the bytes our kernels read; keep the standard layout.
    layer.support_avx512bf16_for_cpu = False
    return layer


def quantize_linears(model: nn.Module, quant: str, double_quant: bool, compute_dtype: torch.dtype,
                     device: torch.device) -> int:
    """Replace every nn.Linear except the output head by a bnb Linear4bit on `device`, one layer at a
    time (only one full-precision layer is ever on the device). Returns how many were replaced.

    The head stays in full precision, as in QLoRA and transformers' 4-bit loading: it is small next to
    the decoder, and 4-bit logits would cost accuracy for little memory.
    """
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_linear(getattr(parent, child), quant, double_quant, compute_dtype, device))
    return len(names)


def load_base(
    name_or_path: str,
    quant: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    lora: dict | None = None,
    on_layer: Callable[[int, nn.Module], None] | None = None,
    on_embeddings: Callable[[nn.Module], None] | None = None,
) -> torch.nn.Module:
    """A frozen causal LM whose linear layers (all but the output head) are bnb `Linear4bit` (or plain,
    with quant="none"). `name_or_path`: a hub id, a local folder, or `builtin:tiny-phi3`.

    `lora`: add_lora's keyword arguments (r, alpha, dropout, targets, use_rslora, use_dora, init): the
    LoRA layers go in while the base loads, each target's initialisation (minilora/lora_init.py) computed
    from its full-precision weight right before that weight is quantized; returned with LoRA in place.
    `on_layer(index, layer)`: called for each decoder layer as soon as it is loaded (minilora/stream_load.py);
    `on_embeddings(module)`: for the input embeddings as soon as they are loaded, unless tied to the head.

    The checkpoint is read tensor by tensor, each linear layer quantized before the next is read
    (minilora/stream_load.py): the host never holds the model in full precision. Checkpoints that loader
    does not read (`.bin` weights) are loaded whole by transformers, then quantized layer by layer."""
    if quant not in QUANT_TYPES:
        raise UserError(f"quant={quant!r}: expected one of {', '.join(QUANT_TYPES)}")
    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    path = resolve_model_path(name_or_path)
    quantizer = Quantizer(quant, double_quant, compute_dtype, device) if quant != "none" else None
    model = load_streaming(name_or_path, compute_dtype, device, quantizer, lora, on_layer, on_embeddings)
    if model is None:
        model = load_whole(name_or_path, path, compute_dtype, device, quantizer, lora, on_layer, on_embeddings)
    if name_or_path.startswith(BUILTIN_PREFIX):
        model.config._name_or_path = name_or_path
    model.config.use_cache = False  # training never decodes; the KV cache only costs memory
    return model


def load_whole(name_or_path: str, path: str, compute_dtype: torch.dtype, device: torch.device,
               quantizer: "Quantizer | None", lora: dict | None,
               on_layer: Callable[[int, nn.Module], None] | None,
               on_embeddings: Callable[[nn.Module], None] | None) -> nn.Module:
    """load_base for checkpoints the streaming loader does not read: transformers loads the whole model on
    the host in the compute dtype, then each linear layer is quantized onto the device (only one
    full-precision layer is ever on the device); `on_embeddings` (unless tied to the head) and `on_layer` are
    called at the end."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype)
    except Exception as err:
        raise unloadable_model(name_or_path, err) from err
    if lora is not None:
        from minilora.inject import add_lora

        add_lora(model, **lora, quantizer=quantizer)  # quantizes the targets' base layers
    if quantizer is not None:
        quantize_linears(model, quantizer.quant, quantizer.double_quant, compute_dtype, device)
        model.is_loaded_in_4bit = True  # how transformers marks 4-bit models; PEFT reads it too
    model.to(device)
    model.requires_grad_(False)
    if lora is not None:
        from minilora.inject import lora_parameters

        for p in lora_parameters(model):
            p.requires_grad_(True)
    if on_embeddings is not None and not embeddings_tied(model):
        on_embeddings(model.get_input_embeddings())
    if on_layer is not None:
        from minilora.training.recompute import decoder_layers

        for index, layer in enumerate(decoder_layers(model)):
            on_layer(index, layer)
    return model


@dataclass(frozen=True)
class Quantizer:
    """How load_base stores a linear layer: `quantize_linear` with these settings."""

    quant: str
    double_quant: bool
    compute_dtype: torch.dtype
    device: torch.device

    def __call__(self, linear: nn.Linear, weight: torch.Tensor | None = None) -> bnb.nn.Linear4bit:
        return quantize_linear(linear, self.quant, self.double_quant, self.compute_dtype, self.device, weight)


def load_tokenizer(name_or_path: str):
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a folder whose files name no usable tokenizer, or a damaged tokenizer.json
        raise unloadable_model(name_or_path, err, "cannot load its tokenizer") from err
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id serves; eos is always there.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_local_model(name_or_path: str) -> bool:
    return name_or_path.startswith(BUILTIN_PREFIX) or Path(name_or_path).exists()
