"""Held-out loss and perplexity, weighted by target tokens."""

import contextlib
import math

import torch
from torch import nn

from .batching import Batch
from .loss import loss_sum


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], autocast=contextlib.nullcontext) -> dict:
    """{'loss', 'ppl', 'tokens'} over `batches` (eval mode: no dropout; training mode restored)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            with autocast():
                total += loss_sum(model, batch).item()
            tokens += batch.n_target_tokens
    finally:
        model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
