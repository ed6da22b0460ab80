"""Which path computes a LoRA layer over a 4-bit base: the fused Triton kernels or plain PyTorch.

Decided once per layer, input device and dtype, on the layer's first forward there (`fused_path`):
the layer keeps the answer and later forwards only look it up. The mode (`auto`, `triton`, `torch`)
is a setting of each layer: `minilora.set_kernel_mode(model, mode)` (train.py's `--kernels`), else
`default_mode()`: the `MINILORA_KERNELS` environment variable, else `auto`.
`auto` uses Triton on CUDA when the layer's shape is supported and the kernels pass a one-time
self-check against PyTorch on that device and dtype, and PyTorch otherwise; `triton` insists, and
on a CPU it runs only inside Triton's interpreter (`TRITON_INTERPRET=1`), which is how CPU tests
exercise it.
"""

import contextlib
import os
import warnings
from collections.abc import Callable
from functools import cache, partial

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
        import minilora.kernels  # noqa: F401
    except ImportError as err:
        raise UserError(f"--kernels triton: the Triton kernels cannot be imported ({err})") from err


def fused_path(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, mode: str,
               config=None) -> Callable | None:
    """The fused kernel that computes a layer for inputs on x's device in x's dtype, or None for the
    PyTorch path. `weight` is the base weight (a bnb Params4bit for the kernels), `config` a
    `minilora.kernels.KernelConfig` (None: the kernels' default). Warns when `triton` mode cannot
    use the kernels, or when `auto` mode's self-check turns them off."""
    if mode == "torch" or getattr(weight, "quant_state", None) is None:
        return None
    if not (x.is_cuda or (mode == "triton" and triton_interpreted())):
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
    if mode == "auto":
        failed = self_check(str(x.device), x.dtype, config)
        if failed:
            _warn_once(f"Triton kernels disabled (self-check failed on {x.device} in {x.dtype}: {failed}); "
                       "using PyTorch")
            return None
    return fused


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"minilora: {message}", stacklevel=5)  # at the caller of the layer's forward


# Relative max error the fused path may show against PyTorch in the self-check, per compute dtype.
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


@contextlib.contextmanager
def _isolated(device_type: str):
    """The self-check runs inside whatever the first fused call runs in: evaluation under no_grad or
    inference_mode, bf16 autocast, a checkpointed layer (whose saved-tensor hooks would count the
    check's tensors and break that layer's recomputation) or activation offloading. It needs none of
    them: gradients on, autocast off, its saved tensors kept as they are."""
    with (torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False),
          torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
        yield


@cache
def self_check(device: str, dtype: torch.dtype, config=None) -> str | None:
    """None if the fused kernels (with `config`, None: the default) reproduce the PyTorch path on this
    device and dtype, else why not. Run once per (device, dtype, config) before `auto` trusts them."""
    from minilora.kernels import DEFAULT_CONFIG, lora_linear_4bit

    return check_against_pytorch(partial(lora_linear_4bit, config=config or DEFAULT_CONFIG), device, dtype)


def check_against_pytorch(fused: Callable, device: str, dtype: torch.dtype) -> str | None:
    """None if `fused` (`lora_linear_4bit`'s signature) computes what PyTorch does, else why not.

    A small NF4 layer with LoRA, at a decoding-size and a mid-size M (the split-K and tiled branches),
    forward and input gradient. An exception counts as a failure: a kernel that fails to compile or
    launch here must not stop training.
    """
    try:
        with _isolated(torch.device(device).type):
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
            if not err <= SELF_CHECK_TOL.get(dtype, 1e-4):
                return f"differs from PyTorch by {err:.1e} (relative) at M={m}"
    return None
