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

`auto` (the default) decides per run (`choose_mode`). On CUDA it is `selective`: GPU memory is what
the batch size and sequence length can use, and keeping every activation would spend it. On a CPU
it is `none` when the activations of the largest micro-batch, measured on a short probe forward,
fit in half the available memory, and `full` otherwise. A CPU step is compute-bound and RAM is
seldom the limit, so recompute there is pure cost; and the selective policy, which intercepts every
operator of the layer in Python, measured slower than `full` on a 2-core CPU (tiny Phi-3, seq 512).
Under --fsdp the layers are sharded while they load, before any forward, and FSDP2 allows no forward
through a layer before its root's: there a CPU's `auto` is `full`, without a probe.

The wrapper adds one level to module paths (`layers.0.inner.self_attn...`); `canonical_name`
removes it, so adapter keys and checkpoints never see it.
"""

import contextlib

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from minilora.training.memory import available_memory
from minilora.training.offload import OffloadSaved

INNER = "inner"
MODES = ("full", "selective")
# The probe runs two short forwards: enough to separate what grows with the tokens from what does not
# (DoRA keeps each layer's dequantized weight), cheap even for a 4B model on a CPU (~2 x 64 tokens).
PROBE_TOKENS = (16, 48)
# auto keeps every activation on a CPU when they fit in this share of the memory left: the rest is
# for what the estimate does not see (allocator slack, the optimizer's temporaries, other programs).
CPU_MEMORY_SHARE = 0.5


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


def _storage_key(t: torch.Tensor) -> StorageWeakRef:
    """Identifies a tensor's storage by the storage itself, not its address: tensors without data (a model
    built under FakeTensorMode from a config alone, as benchmarks/fsdp_plan.py does) all have address 0."""
    return StorageWeakRef(t.untyped_storage())


def _saved_bytes(model: nn.Module, device: torch.device, tokens: int, params: set[StorageWeakRef]) -> int:
    """Bytes autograd keeps in one training forward of the backbone on a row of `tokens` tokens (tensors
    that share storage count once; storages in `params`, the weights and buffers, are not counted)."""
    kept: dict[StorageWeakRef, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params:
            kept[key] = t.untyped_storage().nbytes()
        return t

    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    positions = torch.arange(tokens, device=device).unsqueeze(0)  # (1, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.base_model(input_ids=ids, position_ids=positions, use_cache=False)  # as the loss calls it
    del out
    return sum(kept.values())


def activation_bytes(model: nn.Module, device: torch.device, tokens: tuple[int, int] = PROBE_TOKENS
                     ) -> tuple[float, float]:
    """(fixed bytes, bytes per token) that autograd keeps in a training forward of `model`'s backbone
    without recompute, from two probe forwards of `tokens` lengths. The RNG state and the model's
    train/eval mode are restored afterwards: the probe changes no dropout mask of the run. `model` may be
    a live model or one built under FakeTensorMode (shapes only: a plan from a config, no memory used);
    what an enclosing autocast or recompute wrapper changes, the probe sees."""
    params = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    was_training = model.training
    model.train()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            short, long = (_saved_bytes(model, device, n, params) for n in tokens)
    finally:
        model.train(was_training)
    per_token = max(long - short, 0) / (tokens[1] - tokens[0])
    return max(short - per_token * tokens[0], 0.0), per_token


def choose_mode(model: nn.Module, device: torch.device, micro_batch_tokens: int, processes: int = 1,
                sharded: bool = False) -> tuple[str, str]:
    """What `--recompute auto` means for this run: (mode, why, in words). `processes`: training
    processes sharing this machine's memory (ranks on one host); each rank decides for itself (the
    mode changes memory and speed, never the numbers). `sharded`: the decoder layers are FSDP groups
    already (--fsdp); the probe cannot run them: a forward through an FSDP group before its root's first
    forward makes that group a root of its own, which FSDP2 then refuses."""
    if device.type == "cuda":
        return "selective", "auto: selective on a GPU (activation memory kept low for batch and length)"
    if sharded:
        return "full", "auto: full on a CPU under --fsdp (the activation probe cannot run sharded layers)"
    free = available_memory(device)
    if free is None:
        return "full", "auto: full on a CPU (the free memory is unknown here)"
    try:
        fixed, per_token = activation_bytes(model, device)
    except Exception as err:  # a model whose backbone the probe cannot call: keep the least memory
        return "full", f"auto: full on a CPU (the activation probe failed: {type(err).__name__}: {err})"
    need, free = fixed + per_token * micro_batch_tokens, free / processes
    words = (f"activations of a {micro_batch_tokens:,}-token micro-batch ~{need / 2**20:,.0f} MiB, "
             f"{free / 2**30:,.1f} GiB available")
    if need <= CPU_MEMORY_SHARE * free:
        return "none", f"auto: none on a CPU ({words})"
    return "full", f"auto: full on a CPU ({words}: over half)"
