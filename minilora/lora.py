"""The LoRA linear layer (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

          x ──────────────► base_layer (frozen; bnb Linear4bit or nn.Linear) ──► W x (+ b) ──┐
          │                                                                                  (+) ─► h
          └─► dropout ─► A [r, in] ─► B [out, r] ─► × scale ─────────────────────────────────┘

    h = W x + scale · B A dropout(x),   scale = alpha / r   (alpha / sqrt(r) with rsLoRA)

The base layer is held as a child and never modified (except by an explicit merge into a
full-precision base). A is initialised kaiming-uniform(a=sqrt(5)) and B to zeros, as PEFT does,
so a fresh adapter leaves the model's output unchanged. LoRA parameters are fp32: the optimizer
updates them in full precision whatever the compute dtype.

Over a 4-bit base the layer runs either the fused Triton kernels or the PyTorch path. Which one is
decided on its first forward per input device and dtype (minilora/dispatch.py, from the layer's
kernel mode and kernel config) and kept: later forwards look it up and call it. The decisions are
dropped when the layer (or a module holding it) is moved or cast, loads a state dict, changes its
kernel setting, or dequantizes its base; replace `base_layer` only through these.
"""

import math
from collections.abc import Callable

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from minilora import dispatch
from minilora.dropout import LoRADropout
from minilora.errors import UserError


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def is_4bit(layer: nn.Module) -> bool:
    return isinstance(layer, bnb.nn.Linear4bit)


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight in full precision, [out, in] (a copy for 4-bit layers)."""
    if is_4bit(layer):
        w = layer.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return layer.weight


def refuse_4bit_merge(layers: dict[str, "LoRALinear"]) -> None:
    """UserError, before any layer changes, if one of `layers` (name -> layer) still has a 4-bit base: a
    merge into it would re-quantize, and NF4 rounding would lose most of an r=8 update."""
    for name, layer in layers.items():
        if is_4bit(layer.base_layer) and not layer.merged:
            raise UserError(
                f"cannot merge LoRA into the 4-bit layer {name} without re-quantizing, which would lose the "
                "update in NF4 rounding; merge into a full-precision copy of the base instead "
                "(minilora.merge_lora(model, dequantize=True), or python -m minilora.merge)")


def plain_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear of `dtype` holding `layer`'s (dequantized, if 4-bit) weight and bias."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(dequantize_weight(layer).to(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.to(dtype))
    return linear.requires_grad_(False)


class LoRALinear(nn.Module):
    """`base_layer(x) + scale * B(A(dropout(x)))` over a frozen linear layer."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        kernels: str | None = None,
        kernel_config=None,
    ):
        """`kernels`: the path over a 4-bit base, "auto", "triton" or "torch" (None: MINILORA_KERNELS,
        else "auto", read when the layer decides; see dispatch.py); `kernel_config`: a
        minilora.kernels.KernelConfig (None: the kernels' default)."""
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = lora_scale(alpha, r, use_rslora)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))
        # The initial factors of an init that subtracted scale · B0 A0 from the base (PiSSA, OLoRA;
        # minilora/lora_init.py): the saved adapter is converted with them to a LoRA of the ordinary base.
        self.register_buffer("initial_A", None, persistent=False)  # [r, in] fp32, or None
        self.register_buffer("initial_B", None, persistent=False)  # [out, r] fp32, or None
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.set_kernels(kernels, kernel_config)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Same law as PEFT (and nn.Linear's default): kaiming-uniform with a = sqrt(5).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def set_initial(self, a: torch.Tensor, b: torch.Tensor, subtracted: bool) -> None:
        """Start from A = a [r, in], B = b [out, r] (an init of lora_init.py); `subtracted`: the base
        holds W - scale · b @ a, so the factors are kept for the conversion on save."""
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        if subtracted:
            self.initial_A = self.lora_A.detach().clone()
            self.initial_B = self.lora_B.detach().clone()

    @property
    def base_changed(self) -> bool:
        """Whether the base holds W - scale · B0 A0 (and the saved adapter is the converted rank-2r LoRA)."""
        return self.initial_A is not None

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @property
    def active_dropout(self) -> LoRADropout | None:
        """The dropout this forward applies to the LoRA input: None in eval mode or at p = 0."""
        return self.dropout if self.training and isinstance(self.dropout, LoRADropout) else None

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, [out, in] in fp32."""
        return (self.lora_B @ self.lora_A) * self.scale

    @property
    def kernel_mode(self) -> str:
        return self._kernel_mode or dispatch.default_mode()

    def set_kernels(self, mode: str | None, config=None) -> None:
        """Choose the path over a 4-bit base: "auto", "triton" or "torch" (None: MINILORA_KERNELS, else
        "auto"), with the kernels' `config` (a minilora.kernels.KernelConfig; None: their default).
        Decided again on the next forward."""
        self._kernel_mode = None if mode is None else dispatch.checked_mode(mode)
        self._kernel_config = config
        self.forget_paths()

    def forget_paths(self) -> None:
        """Drop the kept decisions (and the packed weight state they hold)."""
        self._paths: dict[tuple[torch.device, torch.dtype], Callable | None] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.merged or self.disabled:
            return self.base_layer(x)
        fused = self.fused_kernel(x)
        if fused is None:
            return self._forward_torch(x)
        return fused(x, self.base_layer.bias, self.lora_A, self.lora_B, self.scale, self.active_dropout)

    def fused_kernel(self, x: torch.Tensor) -> Callable | None:
        """The fused kernel for inputs on x's device in x's dtype, None for the PyTorch path: decided
        on the first call there (dispatch.py), then one dict lookup. A subclass whose math the kernels
        do not compute returns None."""
        key = (x.device, x.dtype)
        try:
            return self._paths[key]
        except KeyError:
            fused = dispatch.fused_path(x, self.base_layer.weight, self.lora_A, self.lora_B, self.kernel_mode,
                                        self._kernel_config)
            self._paths[key] = fused
            return fused

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        # Outside autocast the LoRA branch runs in its parameters' dtype (fp32) and is cast back;
        # under autocast F.linear picks the autocast dtype. PEFT does the same, so outputs match.
        cast = not torch.is_autocast_enabled(x.device.type)
        lora_x = x.to(self.lora_A.dtype) if cast else x
        update = F.linear(F.linear(self.dropout(lora_x), self.lora_A), self.lora_B) * self.scale  # (..., out)
        return y + (update.to(y.dtype) if cast else update)

    def merge(self) -> None:
        """Fold scale * B @ A into a full-precision base weight. Idempotent."""
        if self.merged:
            return
        refuse_4bit_merge({type(self).__name__: self})
        with torch.no_grad():
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again (exact up to the base dtype's rounding). Idempotent."""
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def merge_into_full_precision(self, dtype: torch.dtype) -> None:
        """Merge into a full-precision copy of the base, in `dtype`: the base dequantized (if 4-bit) or cast
        to fp32, W + scale·B@A summed in fp32 and rounded once to `dtype` (adding a rounded update to a
        rounded weight would round twice)."""
        if is_4bit(self.base_layer):
            self.dequantize_base(torch.float32)
        else:
            self.base_layer.float()
        self.merge()
        self.base_layer.to(dtype)

    def dequantize_base(self, dtype: torch.dtype) -> None:
        """Replace a 4-bit base layer with an nn.Linear holding its dequantized weight."""
        if is_4bit(self.base_layer):
            self.base_layer = plain_linear(self.base_layer, dtype)
            self.forget_paths()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() ... on this layer or a module above it: the base weight may move.
        self.forget_paths()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.forget_paths()  # loading may replace the base weight
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        # A copy or pickle decides again: the kept paths hold tensors of this layer's packed weight.
        return {**super().__getstate__(), "_paths": {}}

    def extra_repr(self) -> str:
        state4 = getattr(self.base_layer.weight, "quant_state", None)
        kind = state4.quant_type if state4 is not None else str(self.base_layer.weight.dtype).replace("torch.", "")
        rs = ", rslora" if self.use_rslora else ""
        state = ", merged" if self.merged else (", disabled" if self.disabled else "")
        state += ", base - scale*B0@A0" if self.base_changed else ""
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"scale={self.scale:g}, dropout={self.dropout_p:g}{rs}, base={kind}{state}")
