"""The optimizer over the LoRA parameters: AdamW, or bitsandbytes' 8-bit (optionally paged) AdamW.

8-bit AdamW stores both moments in 8 bits with blockwise scales (Dettmers et al. 2022): 2 bytes of
state per parameter instead of 8. Paged, the state can spill to CPU memory under GPU memory pressure.
For r=8 on Phi-3-mini the LoRA state is only ~100 MB in fp32, so this lever matters most at high ranks.
"""

import torch

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
