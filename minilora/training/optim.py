"""The optimizer over the LoRA parameters: AdamW, or bitsandbytes' 8-bit (optionally paged) AdamW.

8-bit AdamW stores both moments in 8 bits with blockwise scales (Dettmers et al. 2022): 2 bytes of
state per parameter instead of 8. Paged, the state can spill to CPU memory under GPU memory pressure.
For r=8 on Phi-3-mini the LoRA state is only ~100 MB in fp32, so this lever matters most at high ranks.

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) gives B a learning rate `ratio` times A's,
through two parameter groups that carry their `lr_ratio`; the loop sets each group's lr to the
schedule's lr times it.
"""

from collections.abc import Iterable

import torch
from torch import nn

from minilora.recipe import OPTIMIZERS


def make_optimizer(name: str, params: list, lr: float, weight_decay: float, device: torch.device):
    if name == "adamw":
        fused = device.type == "cuda"  # one kernel for all tensors; foreach is the CPU equivalent
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                 fused=fused or None, foreach=None if fused else True)
    import bitsandbytes as bnb

    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def lora_plus_groups(layers: Iterable[nn.Module], lr: float, ratio: float) -> list[dict]:
    """LoRA+: A at `lr`; B, and DoRA's 1-D magnitude vector (grouped with B, as PEFT's
    `create_loraplus_optimizer` does), at `lr * ratio`."""
    params = [(name, p) for layer in layers for name, p in layer.adapter_params().items()]
    return [{"params": [p for name, p in params if name == "lora_A"], "lr": lr, "lr_ratio": 1.0},
            {"params": [p for name, p in params if name != "lora_A"], "lr": lr * ratio, "lr_ratio": ratio}]
