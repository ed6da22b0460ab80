"""minilora's Triton kernels: NF4 dequant and a LoRA linear layer fused over a 4-bit weight.

Installed as `minilora.kernels` (pyproject's package-dir) from `kernels/minilora.kernels/`: a folder name
no import statement can reach, so this code never runs as a top-level `kernels`, the name of Hugging Face's
PyPI project that transformers imports. The package imports nothing from `minilora`: what a kernel needs
(the LoRA dropout, the tile configuration) is passed in.
Without a GPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 set before import).

    dequantize_4bit(packed, quant_state, dtype) -> (N, K)     nf4.py, bit-exact with bitsandbytes
    lora_linear_4bit(x, weight, bias, lora_A, lora_B, scale, dropout, config) -> (..., N)
    prepare(x, weight, lora_A, lora_B, config) -> FusedLoRA4bit
                                                              fused_lora.py; checked once, then called
                                                              per forward (what a LoRA layer keeps)
    unsupported_reason(x, weight) -> str | None               support.py; None: the kernels can run
    interpreted() -> bool                                     nf4.py: Triton's interpreter runs them (CPU)
    KernelConfig, DEFAULT_CONFIG                              tiles.py: which branch and tiles a launch uses
    *_reference                                               reference.py, the PyTorch oracle
    python -m minilora.kernels.compile_check --arch 90|80     compile every launch for a GPU, without one
"""

from . import tiles
from .fused_lora import FusedLoRA4bit, LoRALinear4bitFunction, lora_linear_4bit, prepare
from .nf4 import dequantize_4bit, interpreted
from .reference import dequantize_4bit_reference, lora_linear_4bit_reference
from .support import unsupported_reason
from .tiles import DEFAULT as DEFAULT_CONFIG
from .tiles import KernelConfig, TileConfig

__all__ = [
    "DEFAULT_CONFIG", "FusedLoRA4bit", "KernelConfig", "LoRALinear4bitFunction", "TileConfig", "dequantize_4bit",
    "dequantize_4bit_reference", "interpreted", "lora_linear_4bit", "lora_linear_4bit_reference", "prepare", "tiles",
    "unsupported_reason",
]
