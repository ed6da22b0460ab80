"""The dropout on a LoRA branch's input: one law for every path (the PyTorch layer, DoRA, the fused
kernels and their reference).

The law is nn.Dropout's: each element is zeroed with probability p and the others are scaled by
1 / (1 - p). On CUDA it is `F.dropout` itself, one fused kernel. On a CPU, PyTorch draws one Bernoulli
sample per element from a serial Mersenne Twister, about 4 ns an element: a fifth of a CPU training
step at the default recipe (p = 0.05 on every target). Here a CPU mask costs about a quarter of that
(measured 1.3-1.6 against 4.6-6.0 ns an element on a 2-core EPYC; the whole dropout 2-3 against 5-9):
each 64-bit draw of the same generator is cut into four 16-bit lanes, and an element is kept when its
lane is at least p * 2^16. So p is rounded to a multiple of 2^-16 (0.05 -> 0.0500031) and the kept
elements are scaled by 1 / (1 - p rounded): the expectation stays exact. PyTorch's own CPU draw is
quantised too (a float uniform sample has 24 bits).

The bits come from torch's default generator, so `torch.manual_seed` decides the masks, checkpointing
(which replays the generator's state) redraws the same masks in its recompute, and a resumed run draws
what the uninterrupted run would. Backward keeps the mask as bool, 1 byte an element (nn.Dropout on a
CPU keeps a float mask, 4 bytes).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

LANES = 2**16  # values of one 16-bit lane


def lane_threshold(p: float) -> int:
    """Lanes below this value drop their element: p rounded to a multiple of 2^-16, times 2^16."""
    return round(p * LANES)


def cpu_keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask of `shape`, True where an element is kept (probability 1 - lane_threshold(p) / 2^16)."""
    n = math.prod(shape)
    # randint over the whole int64 range: 64 random bits per draw (the range is 2^64 - 1 wide, so the
    # value 2^63 - 1 never comes up: a bias of 2^-64 per draw).
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)  # (ceil(n / 4),)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over [-2^15, 2^15)
    return lanes >= lane_threshold(p) - LANES // 2


def lora_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """dropout(x) for a LoRA branch: F.dropout off the CPU, the 16-bit-lane draw on it (module docstring)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    threshold = lane_threshold(p)
    if threshold == 0:  # p below 2^-17 rounds to keeping everything
        return x
    if threshold == LANES:  # p within 2^-17 of 1 rounds to dropping everything (as nn.Dropout(1.0))
        return x * 0.0
    keep = cpu_keep_mask(x.shape, p)
    return (x * keep).mul_(LANES / (LANES - threshold))  # autograd keeps `keep` (bool) for backward


class LoRADropout(nn.Dropout):
    """nn.Dropout (same `p`, same law) that draws its CPU masks as `lora_dropout` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_dropout(x, self.p, self.training)
