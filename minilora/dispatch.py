"""Which path computes a LoRA layer over a 4-bit base: the fused Triton kernels or plain PyTorch.

Decided once per layer, input device and dtype, on the layer's first forward there (`fused_path`):
the layer keeps the answer and later forwards only look it up. The mode (`auto`, `triton`, `torch`)
is a setting of each layer: `minilora.set_kernel_mode(model, mode)` (train.py's `--kernels`), else
`default_mode()`: the `MINILORA_KERNELS` environment variable, else `auto`.
`auto` uses Triton on CUDA when the layer's shape is supported, and PyTorch otherwise; `triton`
insists, and on a CPU it runs only inside Triton's interpreter (`TRITON_INTERPRET=1`), which is how CPU
tests exercise it. Whether the kernels compute what PyTorch does on a given machine is checked outside
training: the tests, the GPU suite and `python -m minilora.env --check` (minilora/kernel_check.py).
"""

import os
import warnings
from collections.abc import Callable

import torch

from minilora.errors import UserError
from minilora.recipe import KERNEL_MODES

MODES = KERNEL_MODES
_warned: set[str] = set()


def default_mode() -> str:
    """The mode a new LoRA layer starts with: MINILORA_KERNELS, else `auto`."""
    mode = os.environ.get("MINILORA_KERNELS", "auto")
    if mode not in MODES:
        raise UserError(f"MINILORA_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def kernels_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter (on CPU tensors). Triton decides, from
    TRITON_INTERPRET when the kernels are first imported; the kernels report it (`interpreted`)."""
    try:
        from minilora.kernels import interpreted  # imports triton: asked only off CUDA in `triton` mode
    except ImportError:
        return False
    return interpreted()


def check_kernel_mode(mode: str, device: torch.device | str) -> None:
    """Fail early, before any model is loaded, when `mode` cannot run on `device`."""
    if mode not in MODES:
        raise UserError(f"--kernels {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "triton":
        return
    if torch.device(device).type != "cuda" and not kernels_interpreted():
        raise UserError(
            "--kernels triton needs a CUDA GPU (on a CPU, set TRITON_INTERPRET=1 to run the kernels "
            "in Triton's interpreter: slow, for testing); use --kernels auto or torch"
        )
    try:
        import minilora.kernels  # noqa: F401
    except ImportError as err:
        raise UserError(f"--kernels triton: the Triton kernels cannot be imported ({err})") from err


def fused_path(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, mode: str,
               config=None) -> Callable | None:
    """The fused kernel that computes a layer for inputs on x's device in x's dtype, or None for the
    PyTorch path. `weight` is the base weight (a bnb Params4bit for the kernels), `config` a
    `minilora.kernels.KernelConfig` (None: the kernels' default). Warns when `triton` mode cannot
    use the kernels."""
    if mode == "torch" or getattr(weight, "quant_state", None) is None:
        return None
    if not (x.is_cuda or (mode == "triton" and kernels_interpreted())):
        if mode == "triton":
            check_kernel_mode(mode, x.device)
        return None
    from minilora.kernels import DEFAULT_CONFIG, prepare  # imports triton: only where the kernels may run

    try:
        fused = prepare(x, weight, lora_A, lora_B, config or DEFAULT_CONFIG)
    except ValueError as err:
        if mode == "triton":
            _warn_once(f"Triton kernels skipped for a layer ({err}); using PyTorch")
        return None
    return fused


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"minilora: {message}", stacklevel=5)  # at the caller of the layer's forward
