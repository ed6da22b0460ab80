"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

DoRA splits the adapted weight into a magnitude and a direction and trains both:

    W' = m · (W + ΔW) / ||W + ΔW||_row,    ΔW = scale · B A,    m [out] initialised to ||W||_row

||·||_row is the L2 norm of each output row (the paper's column norm of W^T). As in the paper's
section 4.3, the norm is treated as a constant in backward (detached): it follows ΔW but gets no
gradient. With the norm computed from the dequantized 4-bit base this is "QDoRA". The forward adds
DoRA's correction to the base layer's output instead of forming W' (same algebra as PEFT's
`tuners/lora/dora.py`, `DoraLinearLayer.forward`, so the two agree to float rounding):

    h = base(x) + (m/n - 1) · W x_d + (m/n) · scale · B A x_d,    n = ||W + ΔW||_row (detached)

x_d is the dropped-out input; without active dropout W x_d is the base output itself (minus the
bias), so no second base matmul runs. DoRA layers always take the PyTorch path, never the fused
Triton kernels: the row norm needs the whole dequantized weight anyway, and the kernels compute
only W x + scale · B A x.

On disk the magnitude is PEFT's `base_model.model.<module>.lora_magnitude_vector` [out], fp32,
with `use_dora: true` in adapter_config.json.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minilora.lora import LoRALinear, dequantize_weight, is_4bit


class DoRALinear(LoRALinear):
    """A LoRALinear whose output rows are rescaled to a learned magnitude `lora_magnitude_vector`."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        # B = 0 at init, so this is ||W||_row: the adapted layer starts equal to the base (as PEFT does).
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(torch.float32))  # [out], fp32
        self._merged_norm: torch.Tensor | None = None

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), "lora_magnitude_vector": self.lora_magnitude_vector}

    @torch.no_grad()
    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """||W + scale · B A||_row in `dtype`, [out], outside the autograd graph."""
        weight = dequantize_weight(self.base_layer).to(dtype)  # (out, in)
        delta = (self.lora_B @ self.lora_A).to(dtype)  # (out, in)
        return torch.linalg.norm(weight + self.scale * delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.merged or self.disabled:
            return self.base_layer(x)
        result = self.base_layer(x)  # (..., out), bias included
        out_dtype = result.dtype
        # Outside autocast the DoRA branch runs in the parameters' dtype (fp32), as in PEFT.
        cast = not torch.is_autocast_enabled(x.device.type)
        lora_x = x.to(self.lora_A.dtype) if cast else x
        magnitude_over_norm = (self.lora_magnitude_vector / self.weight_norm(lora_x.dtype)).view(1, -1)  # (1, out)
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        dropped = self.dropout(lora_x)
        if dropping:  # the base part must see the same dropped-out input as the LoRA part
            base_part = F.linear(dropped, dequantize_weight(self.base_layer).to(lora_x.dtype))
        else:
            bias = self.base_layer.bias
            base_part = result - bias if bias is not None else result
        lora_part = F.linear(F.linear(dropped, self.lora_A), self.lora_B)  # (..., out)
        result = result + (magnitude_over_norm - 1) * base_part + magnitude_over_norm * lora_part * self.scale
        return result.to(out_dtype) if cast else result

    def merge(self) -> None:
        """W <- m / ||W + ΔW||_row · (W + ΔW), formed in fp32. Idempotent; 4-bit bases are refused."""
        if self.merged:
            return
        if is_4bit(self.base_layer):
            super().merge()  # raises: never re-quantize
        with torch.no_grad():
            w = self.base_layer.weight
            norm = self.weight_norm(torch.float32)
            factor = (self.lora_magnitude_vector / norm).view(-1, 1)  # (out, 1)
            w.copy_((factor * (w.float() + self.delta_weight())).to(w.dtype))
        # The norm of the unmerged weight, kept to undo the merge (it cannot be recomputed from W').
        self._merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            factor = (self.lora_magnitude_vector / self._merged_norm).view(-1, 1)
            w.copy_((w.float() / factor - self.delta_weight()).to(w.dtype))
        self._merged_norm = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
