"""The optimizer choices over the LoRA parameters."""

import pytest
import torch

from minilora.training.optim import make_optimizer


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_tracks_adamw(name):
    """Same gradients, a few steps: 8-bit state moves the weights like fp32 AdamW (to ~1% of the step)."""
    torch.manual_seed(0)
    start = torch.randn(64, 256) * 0.02
    results = {}
    for opt_name in ("adamw", name):
        p = torch.nn.Parameter(start.clone())
        opt = make_optimizer(opt_name, [p], lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results[opt_name] = p.detach()
    moved = (results["adamw"] - start).abs().mean()
    assert moved > 1e-3  # the weights really moved (3 steps of lr 1e-3)
    assert (results[name] - results["adamw"]).abs().mean() < 0.02 * moved
