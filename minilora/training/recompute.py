"""Gradient (activation) checkpointing per decoder layer, by wrapping the layer modules.

Each decoder layer is replaced by `Recomputed(layer)`, whose forward runs the layer under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`: only the layer's input is kept, and the
layer runs again during backward. Non-reentrant checkpointing needs no input that requires grad
(the frozen base's embeddings give none) and is the faster of the two (PEFT issue 1142).

The wrapper adds one level to module paths (`layers.0.inner.self_attn...`); `canonical_name`
removes it, so adapter keys and checkpoints never see it.
"""

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora.training.offload import OffloadSaved

INNER = "inner"


class Recomputed(nn.Module):
    """`offload`: the layer input that checkpointing keeps goes to pinned host memory (offload.py)."""

    def __init__(self, layer: nn.Module, offload: OffloadSaved | None = None):
        super().__init__()
        self.inner = layer
        self.offload = offload

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.inner(*args, **kwargs)
        # checkpoint saves the layer's inputs as autograd saved tensors, outside its own hooks: an
        # enclosing saved-tensor hook (the offload) sees exactly those, not the layer's internals.
        with self.offload if self.offload is not None else contextlib.nullcontext():
            return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def canonical_name(name: str) -> str:
    """A module path with the Recomputed wrappers taken out."""
    return name.replace(f".{INNER}.", ".") if f".{INNER}." in name else name.removesuffix(f".{INNER}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (`model.layers`, `gpt_neox.layers`, ...)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def enable_recompute(model: nn.Module, every: int = 1, offload: OffloadSaved | None = None) -> int:
    """Wrap every `every`-th decoder layer; returns how many were wrapped. Idempotent."""
    layers = decoder_layers(model)
    wrapped = 0
    for i, layer in enumerate(layers):
        if i % every == 0 and not isinstance(layer, Recomputed):
            layers[i] = Recomputed(layer, offload)
        wrapped += isinstance(layers[i], Recomputed)
    return wrapped
