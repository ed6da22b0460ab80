"""minilora's Triton kernels: NF4 dequant and a LoRA linear layer fused over a 4-bit weight.

Imported as `minilora.kernels` (never as a top-level `kernels`: see minilora/_kernel_loader.py).
Without a GPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 set before import).

    dequantize_4bit(packed, quant_state, dtype) -> (N, K)     nf4.py, bit-exact with bitsandbytes
    lora_linear_4bit(x, weight, bias, lora_A, lora_B, scale, dropout_p, training) -> (..., N)
    unsupported_reason(x, weight) -> str | None               fused_lora.py; None: the kernels can run
    tiles                                                     which branch and tile sizes a launch uses
    *_reference                                               reference.py, the PyTorch oracle
"""

from . import tiles
from .fused_lora import LoRALinear4bitFunction, lora_linear_4bit, unsupported_reason
from .nf4 import dequantize_4bit
from .reference import dequantize_4bit_reference, lora_linear_4bit_reference

__all__ = [
    "LoRALinear4bitFunction", "dequantize_4bit", "dequantize_4bit_reference", "lora_linear_4bit",
    "lora_linear_4bit_reference", "tiles", "unsupported_reason",
]
