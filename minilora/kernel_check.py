"""Do the fused Triton kernels compute what PyTorch computes, on this machine? An explicit check, run
by `python -m minilora.env --check` and the GPU suite, never inside training.

A small NF4 layer with LoRA, at a decoding-size and a mid-size M (the split-K and tiled branches),
forward and input gradient, against bitsandbytes' `Linear4bit` plus the LoRA term in PyTorch.
"""

from collections.abc import Callable
from functools import partial

import torch

# Relative max error the fused path may show against PyTorch, per compute dtype: in fp32 only the summation
# order differs; in fp16 and bf16 the two sides also round the output and the LoRA term in different places,
# a few units of the dtype's rounding (2^-11 and 2^-8 relative).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


def check_kernels(device: str, dtype: torch.dtype, config=None) -> str | None:
    """None if the fused kernels (with `config`, a KernelConfig; None: the default) reproduce the PyTorch
    path on `device` in `dtype`, else why not."""
    from minilora.kernels import DEFAULT_CONFIG, lora_linear_4bit

    return check_against_pytorch(partial(lora_linear_4bit, config=config or DEFAULT_CONFIG), device, dtype)


def check_against_pytorch(fused: Callable, device: str, dtype: torch.dtype) -> str | None:
    """None if `fused` (`lora_linear_4bit`'s signature) computes what PyTorch does, else why not. An
    exception counts as a failure (a kernel that does not compile or launch here), reported in one line."""
    try:
        return _compare_with_pytorch(fused, device, dtype)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def _compare_with_pytorch(fused: Callable, device: str, dtype: torch.dtype) -> str | None:
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    n, k, r = 96, 128, 8
    base = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type="nf4", device="meta")
    base.weight = bnb.nn.Params4bit(torch.randn(n, k, generator=g) * 0.05, requires_grad=False,
                                    quant_type="nf4", compress_statistics=True).to(device)
    base.bias = torch.nn.Parameter((torch.randn(n, generator=g) * 0.1).to(device, dtype), requires_grad=False)
    base.support_avx512bf16_for_cpu = False
    lora_a = (torch.randn(r, k, generator=g) * 0.1).to(device)
    lora_b = (torch.randn(n, r, generator=g) * 0.1).to(device)
    for m in (5, 130):
        x = torch.randn(m, k, generator=g).to(device, dtype)
        outputs = []
        for use_fused in (True, False):
            xi = x.clone().requires_grad_(True)
            if use_fused:
                y = fused(xi, base.weight, base.bias, lora_a, lora_b, 2.0)
            else:
                y = base(xi) + ((xi.float() @ lora_a.T) @ lora_b.T * 2.0).to(dtype)
            y.float().square().sum().backward()
            outputs.append((y.detach().float(), xi.grad.float()))
        for got, want in zip(*outputs, strict=True):
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            if not err <= TOLERANCE.get(dtype, 1e-4):
                return f"differs from PyTorch by {err:.1e} (relative) at M={m}"
    return None
