"""Per-module LoRA statistics during training: `train.py --log-lora-stats N`.

Every N optimizer steps one `metrics.jsonl` line of kind "lora_stats" holds, per adapted module,

    update_norm      ||scale · B A||_F after the step, from the factors: scale · sqrt(<B^T B, A A^T>_F)
                     (two r x r Gram matrices; never the out x in product)
    grad_<param>     the L2 norm of each adapter parameter's gradient (lora_A, lora_B, and DoRA's
                     lora_magnitude_vector), unscaled, before clipping

All norms stay on the device until one transfer per logged step, so the cost is a few small kernels
per module every N steps. `lora_stats.png` beside loss.png draws both over the steps.
"""

from pathlib import Path

import torch
from torch import nn

from minilora.atomic import atomic_write
from minilora.inject import lora_layers
from minilora.training.plot import plt


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


def plot_lora_stats(metrics: list[dict], path: str | Path, title: str = "") -> None:
    """Update norm and total gradient norm per module over the steps, one colour per module kind."""
    records = [m for m in metrics if m.get("kind") == "lora_stats"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    names = list(records[0]["modules"]) if records else []
    kinds = sorted({name.rpartition(".")[2] for name in names})
    colours = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    steps = [r["step"] for r in records]
    for name in names:
        stats = [r["modules"].get(name, {}) for r in records]
        update = [s.get("update_norm") for s in stats]
        grad = [sum(v**2 for k, v in s.items() if k.startswith("grad_")) ** 0.5 for s in stats]
        colour = colours[name.rpartition(".")[2]]
        axes[0].plot(steps, update, color=colour, linewidth=0.8, alpha=0.7)
        axes[1].plot(steps, grad, color=colour, linewidth=0.8, alpha=0.7)
    for ax, label in zip(axes, ("update norm ||scale·BA||_F", "gradient norm (A, B, magnitude)"), strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log" if records else "linear")
    for kind, colour in colours.items():
        axes[0].plot([], [], color=colour, label=kind)
    if kinds:
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
