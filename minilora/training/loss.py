"""Causal-LM loss on the response tokens, without materialising the full logits.

The backbone gives hidden states (B, T, H). Only positions whose next token is a target are kept,
and the vocabulary projection + cross-entropy run over them in chunks, each under non-reentrant
checkpointing: no more than one chunk of logits exists at a time, in forward or backward. For
Phi-3 (vocab 32064) full fp32 logits cost 128 KB per token; prompt tokens never need them at all.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora.data.batching import IGNORE_INDEX, Batch

CHUNK_ROWS = 2048  # rows of logits alive at once: 2048 x 32064 x 4 bytes = 263 MB in fp32


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V): cross-entropy in fp32 whatever the compute dtype
    return F.cross_entropy(logits, targets, reduction="sum")


def loss_sum(model: nn.Module, batch: Batch, chunk_rows: int = CHUNK_ROWS,
             device: torch.device | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's target tokens (a 0-dim fp32 tensor).

    `device`: where the batch goes; None: where the input embeddings are (a model of plain tensors). Under
    FSDP the run's device must be given: the embeddings' sharded weight may live elsewhere (CPU offload)."""
    device = device or model.get_input_embeddings().weight.device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.model_inputs().items()}
    hidden = model.base_model(**inputs).last_hidden_state  # (B, T, H)
    labels = batch.labels.to(device)[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = labels != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]  # (n, H)
    targets = labels[keep]  # (n,)
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h, t, head, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, t, head)
    return total


class LossModule(nn.Module):
    """`forward(batch)` = summed loss over the batch's target tokens: the unit a training step calls
    (and DDP wraps with several ranks, distributed.wrap; FSDP shards as its root group, fsdp.py).

    `device`: the run's, where batches go (the model's parameters may be shards elsewhere, see loss_sum).
    `sharded`: the model's layers are FSDP groups, which every rank must run, forward and backward, in
    every step and evaluation, or the ranks' all-gathers and reduce-scatters no longer pair up."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], device: torch.device, sharded: bool = False):
        super().__init__()
        self.model = model
        self._params = params
        self.sharded = sharded
        self.device = device

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.input_ids.shape[0] == 0:
            if self.sharded:
                return self._empty_shard_loss(batch)
            # An empty shard (a short last batch) still joins the gradient all-reduce, with zeros.
            return sum(p.sum() for p in self._params) * 0.0
        return loss_sum(self.model, batch, device=self.device)

    def _empty_shard_loss(self, batch: Batch) -> torch.Tensor:
        """0, through every layer: one pad token in, so each FSDP group gathers and, in backward,
        reduce-scatters (zero) gradients for all its LoRA weights, as on the ranks with rows."""
        one = torch.zeros((1, 1), dtype=batch.input_ids.dtype)  # (1, 1)
        hidden = self.model.base_model(input_ids=one.to(self.device), position_ids=one.to(self.device),
                                       use_cache=False).last_hidden_state  # (1, 1, H)
        return self.model.get_output_embeddings()(hidden).float().sum() * 0.0
