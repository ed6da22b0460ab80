"""Data parallel training with torch.distributed: `torchrun --nproc_per_node N train.py ...`.

Every rank holds the whole (4-bit) base and the same initial LoRA weights. Each global micro-batch
of `batch_size * world` rows is built identically on every rank and split by rows, so rank r trains
on its shard; LoRA gradients are averaged by DistributedDataParallel once per optimizer step (its
`no_sync` skips the all-reduce on accumulation micro-steps). Rank 0 alone writes files and shows
the progress bar; each host's local rank 0 prepares the data (host_first). NCCL on GPUs, gloo on CPUs.
With --fsdp the same loop runs over FSDP2 groups instead of DDP (fsdp.py).
"""

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from minilora.data.batching import Batch
from minilora.data.examples import count_targets
from minilora.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this host: they share its memory

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(rank, world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Batch, info: DistInfo) -> Batch:
    """Rank `info.rank`'s rows of a global batch (rows split as evenly as torch.tensor_split does)."""
    if not info.enabled:
        return batch
    rows = torch.tensor_split(torch.arange(batch.input_ids.shape[0]), info.world)[info.rank]
    take = lambda t: None if t is None else t[rows]
    labels = batch.labels[rows]
    row_tokens = tuple(batch.row_tokens[i] for i in rows.tolist())
    return replace(batch, input_ids=batch.input_ids[rows], labels=labels,
                   attention_mask=take(batch.attention_mask), position_ids=batch.position_ids[rows],
                   n_target_tokens=count_targets(labels), n_tokens=sum(row_tokens), row_tokens=row_tokens,
                   lines=tuple(batch.lines[i] for i in rows.tolist()))


def host_first(compute, info: DistInfo):
    """`compute()` on each host's local rank 0, then on that host's other ranks, which find its work ready
    (in the data cache) and map the same files: one preparation per host, whatever the ranks per host.

    A UserError on any host (bad data) is raised on every rank with the same message, so all exit cleanly.
    """
    if not info.enabled:
        return compute()
    result, error = None, None
    if info.local_rank == 0:
        try:
            result = compute()
        except UserError as err:
            error = str(err)
    errors = [e for e in gather_objects(error, info) if e is not None]  # also waits for every host
    if errors:
        raise UserError(errors[0])
    return result if info.local_rank == 0 else compute()


def wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    """`module` itself in one process; with several ranks, DDP over it (gradients all-reduced)."""
    if not info.enabled:
        return module
    device_ids = [info.local_rank] if torch.cuda.is_available() else None
    # Every rank loaded the same base and seeded the same LoRA init: no start-up broadcast of the
    # (large) base weights is needed, and the rotary buffers are constants.
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, init_sync=False,
                                               broadcast_buffers=False)


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (a stop decision all ranks must share)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out
