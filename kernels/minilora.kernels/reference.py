"""The PyTorch oracle for the kernels: the same math with bitsandbytes' dequant and plain matmuls.

    y = x @ dequant(W)^T + bias  +  scale * (dropout(x) @ A^T) @ B^T

The base term is what bitsandbytes' `Linear4bit` computes (in x's dtype); the LoRA term runs in fp32
on the fp32 adapter weights, then is rounded to x's dtype and added, as minilora's PyTorch path does.
Gradients come from autograd. bitsandbytes is imported where it is used, so importing the kernels does not
load it.
"""

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F


def dequantize_4bit_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequant (N, K), each value rounded once from fp32 to `dtype`."""
    import bitsandbytes.functional as bnbf

    state = copy.copy(quant_state)  # bitsandbytes rounds to quant_state.dtype: ask for ours directly
    state.dtype = dtype
    return bnbf.dequantize_4bit(packed, state)


def lora_linear_4bit_reference(x: torch.Tensor, weight, bias: torch.Tensor | None, lora_A: torch.Tensor,
                               lora_B: torch.Tensor, scale: float,
                               dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """y (..., N) in x's dtype for x (..., K), a bnb Params4bit `weight`, lora_A (r, K), lora_B (N, r);
    `dropout` as `lora_linear_4bit` takes it (None: no dropout)."""
    w = dequantize_4bit_reference(weight.data, weight.quant_state, x.dtype)  # (N, K)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    xl = x.to(lora_A.dtype)  # minilora's PyTorch path (and PEFT) drop out the input cast to fp32
    xd = xl if dropout is None else dropout(xl)
    lora = F.linear(F.linear(xd, lora_A), lora_B) * scale  # (..., N) fp32
    return y + lora.to(y.dtype)
