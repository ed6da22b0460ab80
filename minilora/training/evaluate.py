"""Held-out loss and perplexity, weighted by target tokens."""

import contextlib
import math

import torch
from torch import nn

from minilora.data.batching import Batch
from minilora.training.distributed import DistInfo, all_reduce_sum, shard
from minilora.training.loss import loss_sum


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], autocast=contextlib.nullcontext,
             dist: DistInfo | None = None, sharded: nn.Module | None = None,
             device: torch.device | None = None) -> dict:
    """{'loss', 'ppl', 'tokens'} over `batches` (eval mode: no dropout; training mode restored).

    With several ranks each evaluates its rows of every batch and the sums are reduced. `sharded`: the
    FSDP root (training.fsdp) the loss runs through; every rank then runs every batch, even one without
    targets, since each layer's forward gathers its shards from all ranks. `device`: the run's (None: the
    input embeddings', right for a model of plain tensors; under FSDP the shards may be offloaded)."""
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    device = device or model.get_input_embeddings().weight.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, target tokens)
    try:
        for batch in batches:
            part = shard(batch, dist)
            if part.n_target_tokens == 0 and sharded is None:
                continue
            with autocast():
                sums[0] += (sharded(part) if sharded is not None else loss_sum(model, part, device=device)).double()
            sums[1] += part.n_target_tokens
    finally:
        model.train(was_training)
    total, tokens = all_reduce_sum(sums, dist).tolist()
    tokens = int(tokens)
    loss = total / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
