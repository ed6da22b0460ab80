"""Which path computes a LoRA layer over a 4-bit base: the fused Triton kernels or plain PyTorch.

Chosen per call from the mode (`auto`, `triton`, `torch`): set by `set_kernel_mode` (train.py's
`--kernels`), else the `MINILORA_KERNELS` environment variable, else `auto`. `auto` uses Triton on
CUDA when the layer's shape is supported and PyTorch otherwise; `triton` insists, and on a CPU it
runs only inside Triton's interpreter (`TRITON_INTERPRET=1`), which is how CPU tests exercise it.
"""

import os
import warnings

import torch

from .errors import UserError

MODES = ("auto", "triton", "torch")
_mode: str | None = None
_warned: set[str] = set()


def kernel_mode() -> str:
    mode = _mode or os.environ.get("MINILORA_KERNELS", "auto")
    if mode not in MODES:
        raise UserError(f"MINILORA_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_mode(mode: str, device: torch.device | str) -> None:
    """Fail early, before any model is loaded, when `mode` cannot run on `device`."""
    if mode not in MODES:
        raise UserError(f"--kernels {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "triton":
        return
    if torch.device(device).type != "cuda" and not triton_interpreted():
        raise UserError(
            "--kernels triton needs a CUDA GPU (on a CPU, set TRITON_INTERPRET=1 to run the kernels "
            "in Triton's interpreter: slow, for testing); use --kernels auto or torch"
        )
    try:
        from ._kernel_loader import load_kernels

        load_kernels()
    except ImportError as err:
        raise UserError(f"--kernels triton: the Triton kernels cannot be imported ({err})") from err


def set_kernel_mode(mode: str | None) -> None:
    """Set the mode for this process (None: back to MINILORA_KERNELS / auto)."""
    global _mode
    if mode is not None and mode not in MODES:
        raise UserError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    _mode = mode


def use_triton(x: torch.Tensor, weight) -> bool:
    """True when this call should take the fused Triton path (`weight` is a bnb Params4bit)."""
    mode = kernel_mode()
    if mode == "torch" or getattr(weight, "quant_state", None) is None:
        return False
    runnable = x.is_cuda or (mode == "triton" and triton_interpreted())
    if not runnable:
        if mode == "triton":
            check_kernel_mode(mode, x.device)
        return False
    from ._kernel_loader import load_kernels

    reason = load_kernels().unsupported_reason(x, weight)
    if reason is not None:
        if mode == "triton" and reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"minilora: Triton kernels skipped for a layer ({reason}); using PyTorch", stacklevel=3)
        return False
    return True
