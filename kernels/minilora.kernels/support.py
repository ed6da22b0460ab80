"""Which layers and inputs the fused kernels can compute: checked once per layer, device and dtype.

Everything here is read from the weight's bitsandbytes state and the input's device, dtype and width,
so a LoRA layer asks once (minilora/dispatch.py) and keeps the answer for later calls.
"""

import torch

from .nf4 import Packed4bit, interpreted, pack_state

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_for(x: torch.Tensor, weight) -> Packed4bit:
    """`weight`'s packed state (pack_state checks its layout) once x is known to fit the kernels;
    ValueError with a short reason otherwise."""
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("weight is not a bitsandbytes 4-bit parameter (no quant_state)")
    pk = pack_state(weight.data, qs)
    if x.dtype not in DTYPES:
        raise ValueError(f"dtype {str(x.dtype).removeprefix('torch.')}")
    if pk.k % pk.blocksize != 0:
        raise ValueError(f"K % {pk.blocksize} != 0")  # load_w_tile needs whole blocks per row
    if x.shape[-1] != pk.k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {pk.k}")
    if x.device != weight.device:
        raise ValueError(f"x on {x.device}, weight on {weight.device}")
    if x.device.type == "cpu" and not interpreted():
        raise ValueError("cpu tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {x.device.type}")
    return pk


def unsupported_reason(x: torch.Tensor, weight) -> str | None:
    """None when the fused Triton path can compute this layer; else a short reason (use PyTorch)."""
    try:
        packed_for(x, weight)
    except ValueError as err:
        return str(err)
    return None
