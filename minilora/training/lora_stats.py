"""Per-module LoRA statistics during training: `train.py --log-lora-stats N`.

Every N optimizer steps one `metrics.jsonl` line of kind "lora_stats" holds, per adapted module,

    update_norm      ||scale · B A||_F after the step, from the factors: scale · sqrt(<B^T B, A A^T>_F)
                     (two r x r Gram matrices; never the out x in product)
    grad_<param>     the L2 norm of each adapter parameter's gradient (lora_A, lora_B, and DoRA's
                     lora_magnitude_vector), unscaled, before clipping

All norms stay on the device until one transfer per logged step, so the cost is a few small kernels
per module every N steps. `lora_stats.png` beside loss.png draws both over the steps.
"""


import torch
from torch import nn

from minilora.inject import lora_layers


class LoRAStats:
    """Collects the statistics of `model`'s LoRA layers every `every` optimizer steps."""

    def __init__(self, model: nn.Module, every: int):
        self.layers = lora_layers(model)
        self.every = every
        self.param_names = list(next(iter(self.layers.values())).adapter_params())

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor:
        """(modules, params) gradient norms, on the device; call between backward and zero_grad."""
        rows = []
        for layer in self.layers.values():
            params = list(layer.adapter_params().values())
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            rows.append(torch.stack(torch._foreach_norm(grads)))
        return torch.stack(rows).float()

    @torch.no_grad()
    def update_norms(self) -> torch.Tensor:
        """(modules,) ||scale · B A||_F from r x r Gram matrices, on the device."""
        norms = []
        for layer in self.layers.values():
            gram_b = layer.lora_B.T @ layer.lora_B  # (r, r)
            gram_a = layer.lora_A @ layer.lora_A.T  # (r, r)
            norms.append(abs(layer.scale) * (gram_b * gram_a).sum().clamp_min(0).sqrt())
        return torch.stack(norms).float()

    def record(self, step: int, grad_norms: torch.Tensor) -> dict:
        values = torch.cat([self.update_norms()[:, None], grad_norms], dim=1).tolist()  # the one host sync
        keys = ["update_norm"] + [f"grad_{name}" for name in self.param_names]
        return {"kind": "lora_stats", "step": step,
                "modules": {name: dict(zip(keys, row, strict=True)) for name, row in zip(self.layers, values,
                                                                                          strict=True)}}

