"""Gradient (activation) checkpointing per decoder layer, by wrapping the layer modules.

Each decoder layer is replaced by `Recomputed(layer)`, whose forward runs the layer under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`: only the layer's input is kept, and the
layer runs again during backward. Non-reentrant checkpointing needs no input that requires grad
(the frozen base's embeddings give none) and is the faster of the two (PEFT issue 1142).

Selective recompute (`mode="selective"`) runs the same checkpoint with a policy from PyTorch's
selective activation checkpointing (`create_selective_checkpoint_contexts`): the outputs of matrix
products (`aten.mm`/`addmm`: the 4-bit base layers' and LoRA's GEMMs) and of fused attention kernels
are kept, everything else (norms, rotary embedding, activations, dropout, the NF4 dequantisation) is
recomputed. The kept tensors are the expensive ones to recompute (O(K) FLOPs per stored element for
a K-deep product) and the rest are cheap (O(1) per element) but about as large. Batched products
(`bmm`) are not kept: in the unfused attention path they are the (T, T) score matrices. Products run
inside Triton kernels are invisible to the policy and are recomputed as with `full`.

The wrapper adds one level to module paths (`layers.0.inner.self_attn...`); `canonical_name`
removes it, so adapter keys and checkpoints never see it.
"""

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from minilora.training.offload import OffloadSaved

INNER = "inner"
MODES = ("full", "selective")


def _kept_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    try:  # minilora.attention's kernel on CUDA (registers the op on import)
        from torch.nn.attention import varlen  # noqa: F401

        ops.add(torch.ops.torch_attn._varlen_attn.default)
    except (ImportError, AttributeError):
        pass
    return frozenset(ops)


KEPT_OPS = _kept_ops()


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_products)


class Recomputed(nn.Module):
    """`offload`: the layer input that checkpointing keeps goes to pinned host memory (offload.py).
    `mode`: "full" (keep only the input) or "selective" (also keep products, see the module docstring)."""

    def __init__(self, layer: nn.Module, offload: OffloadSaved | None = None, mode: str = "full"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"recompute mode must be one of {MODES}, got {mode!r}")
        self.inner = layer
        self.offload = offload
        self.context_fn = _selective_contexts if mode == "selective" else None

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self.inner(*args, **kwargs)
        # checkpoint saves the layer's inputs as autograd saved tensors, outside its own hooks: an
        # enclosing saved-tensor hook (the offload) sees exactly those, not the layer's internals.
        with self.offload if self.offload is not None else contextlib.nullcontext():
            if self.context_fn is None:
                return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
            return checkpoint(self.inner, *args, use_reentrant=False, context_fn=self.context_fn, **kwargs)


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


def enable_recompute(model: nn.Module, every: int = 1, offload: OffloadSaved | None = None,
                     mode: str = "full") -> int:
    """Wrap every `every`-th decoder layer; returns how many were wrapped. Idempotent."""
    layers = decoder_layers(model)
    wrapped = 0
    for i, layer in enumerate(layers):
        if i % every == 0 and not isinstance(layer, Recomputed):
            layers[i] = Recomputed(layer, offload, mode)
        wrapped += isinstance(layers[i], Recomputed)
    return wrapped
