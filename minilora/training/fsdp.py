"""Fully sharded data parallel training (`--fsdp`) with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Groups: each decoder layer; the input embeddings (unless tied to the head); and the loss module as the root,
holding what is left (the final norm and the output head). Layers and embeddings are sharded while they load
(LoadSharder), each before the next tensor is read. A rank keeps 1/world of every parameter (the LoRA weights;
the frozen base, 4-bit as packed codes and statistics through minilora/fsdp_nf4.py, or full precision with
--quant none) and of the AdamW state, which the optimizer builds over the sharded (DTensor) parameters.
Before a group runs, it is all-gathered; after a layer's backward, its LoRA gradients are reduce-scattered
(averaged over ranks, as DDP does, so the loop's loss scaling is the same).

Every group's collectives must pair up across ranks, so a group is a module every rank calls the same number
of times per forward: a layer and the embeddings once. The head is not: the chunked loss (training/loss.py)
calls it once per 2,048 target rows, a count that differs between ranks, so it stays in the root, gathered
once for the whole forward.

Only the LoRA weights train, so every group's trainable parameters are fp32 and FSDP2's
"uniform dtype" requirement holds in each group (it applies to trainable parameters). On GPUs the
all-gather runs in bf16 and gradients reduce in fp32 (MixedPrecisionPolicy); on CPUs (gloo) everything
stays fp32, so a CPU run equals a one-process run up to summation order.

FSDP2 reference: https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from minilora.fsdp_nf4 import make_4bit_shardable
from minilora.inject import lora_layers
from minilora.stream_load import embeddings_tied
from minilora.training.recompute import Recomputed, decoder_layers


def ensure_process_group() -> bool:
    """A one-process group when torchrun started none (--fsdp on one rank: the same sharded code path, so a
    2-rank checkpoint resumes on 1 rank). Returns whether it was created here."""
    if dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1)
    return True


def fsdp_options(device: torch.device, precision: str, offload: bool) -> dict:
    """fully_shard's keyword arguments for this run, the same for every group: all ranks in one mesh;
    `precision` the run's ("fp32", "bf16", "fp16"); `offload`: sharded parameters, gradients and optimizer
    state live in CPU memory (CPUOffloadPolicy). A one-dimensional mesh over all ranks reuses the default
    process group (init_device_mesh does, where the group's backend serves the device: gloo on CPUs, NCCL
    on GPUs), so building the options twice (the loader's layers, then the root) makes no second group."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # fp32 gradient reduction: averaging bf16 gradients over ranks would round each partial sum.
    mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    return dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())


def shard_layer(layer: nn.Module, options: dict) -> None:
    """One decoder layer as its own FSDP group: its 4-bit weights made shardable (packed codes and statistics,
    fsdp_nf4.py), then fully_shard. FSDP copies this rank's shard out of each tensor; the whole tensors are
    freed when nothing else holds them."""
    make_4bit_shardable(layer)
    fully_shard(layer, **options)


def shard_embeddings(embeddings: nn.Module, options: dict) -> None:
    """The input embeddings as their own FSDP group, gathered for their forward only. They are frozen (no
    gradient to reduce), so backward must not gather them: FSDP2 would otherwise prefetch them after the first
    layer's backward and hold the whole table until the step ends."""
    fully_shard(embeddings, **options)
    embeddings.set_unshard_in_backward(False)


class LoadSharder:
    """load_base's callbacks for --fsdp: each decoder layer (`on_layer`) and the input embeddings
    (`on_embeddings`; the loader hands them over unless tied to the head) become FSDP groups as soon as they are
    loaded, before the next tensor is read. A rank then holds its shards of what is loaded so far, one layer in
    full precision and, once the last layer is in, the head whole until the root is sharded (on the streaming
    loader; its from_pretrained fallback calls both once the whole model is loaded)."""

    def __init__(self, device: torch.device, precision: str, offload: bool):
        self.options = fsdp_options(device, precision, offload)

    def on_layer(self, index: int, layer: nn.Module) -> None:
        shard_layer(layer, self.options)

    def on_embeddings(self, embeddings: nn.Module) -> None:
        shard_embeddings(embeddings, self.options)


def shard_for_training(root: nn.Module, model: nn.Module, device: torch.device, precision: str,
                       offload: bool) -> nn.Module:
    """fully_shard what the loader has not sharded yet: each decoder layer of `model`, its input embeddings
    where they are not tied to the head, then `root` (the module whose forward the loop calls: the loss module
    holding `model`; it takes the final norm and the head). A layer wrapped for recomputation is sharded
    inside its wrapper, as the loader shards it: FSDP2 lets the recomputed forward run on the parameters its
    pre-backward hook gathered."""
    options = fsdp_options(device, precision, offload)
    for layer in decoder_layers(model):
        inner = layer.inner if isinstance(layer, Recomputed) else layer
        if not isinstance(inner, FSDPModule):
            shard_layer(inner, options)
    embeddings = model.get_input_embeddings()
    if not embeddings_tied(model) and not isinstance(embeddings, FSDPModule):  # tied: the root holds the pair
        shard_embeddings(embeddings, options)
    make_4bit_shardable(model)  # any 4-bit weight outside the decoder layers goes to the root's group
    fully_shard(root, **options)
    return root


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself if it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded tensor (collective: every rank must call it), else the tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered_adapter(model: nn.Module):
    """Inside: each LoRA layer's adapter parameters are whole tensors on every rank (one all-gather per
    LoRA tensor; the base is never gathered), so adapter.save_adapter and the checks read them as in a
    one-process run. Collective. Afterwards the sharded parameters are back in place, unchanged."""
    swapped = []
    try:
        for layer in lora_layers(model).values():
            for name, param in layer.adapter_params().items():
                if isinstance(param, DTensor):
                    whole = nn.Parameter(param.detach().full_tensor(), requires_grad=False)
                    swapped.append((layer, name, param))
                    layer._parameters[name] = whole  # what FSDP2 itself does to swap in unsharded parameters
        yield model
    finally:
        for layer, name, param in swapped:
            layer._parameters[name] = param
