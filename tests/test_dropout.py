"""The LoRA dropout law (minilora/dropout.py): nn.Dropout's distribution, drawn from torch's generator."""

import pytest
import torch
import torch.nn.functional as F

from minilora.dropout import LANES, LoRADropout, cpu_keep_mask, lane_threshold, lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_scale_follow_p(p):
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    y = lora_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    kept_value = LANES / (LANES - lane_threshold(p))
    # 400k Bernoulli draws: the standard error of the rate is < 8e-4; allow 5 of them.
    assert dropped == pytest.approx(p, abs=4e-3)
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(kept_value)]
    assert abs(kept_value - 1 / (1 - p)) < 1e-4  # p rounded to a multiple of 2^-16
    assert y.mean().item() == pytest.approx(1.0, abs=5e-3)  # the expectation is kept


def test_lanes_are_independent_of_their_position_in_a_draw():
    """Each 64-bit draw feeds four elements: every lane position must drop at the same rate."""
    torch.manual_seed(1)
    keep = cpu_keep_mask(torch.Size([4 * 200_000]), 0.25).view(-1, 4)
    rates = 1 - keep.float().mean(0)
    torch.testing.assert_close(rates, torch.full((4,), 0.25), atol=6e-3, rtol=0)


def test_lanes_of_one_draw_drop_independently():
    """Two lanes of the same 64-bit draw are both dropped with probability p^2 (not p, not 0)."""
    torch.manual_seed(4)
    dropped = ~cpu_keep_mask(torch.Size([4 * 250_000]), 0.3).view(-1, 4)
    for i, j in ((0, 1), (1, 2), (0, 3)):
        both = (dropped[:, i] & dropped[:, j]).float().mean().item()
        assert abs(both - 0.09) < 4e-3, (i, j, both)  # 250k pairs: standard error 6e-4


def test_p_within_2_to_the_minus_17_of_one_drops_everything():
    x = torch.randn(5, 6, requires_grad=True)
    y = lora_dropout(x, 1 - 1e-7)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(x.grad, torch.zeros_like(x))


def test_seed_decides_the_mask_and_odd_shapes_work():
    x = torch.randn(3, 7, 5)  # 105 elements: not a multiple of 4
    torch.manual_seed(5)
    a = lora_dropout(x, 0.3)
    torch.manual_seed(5)
    b = lora_dropout(x, 0.3)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, lora_dropout(x, 0.3))  # the generator moved on


def test_backward_is_the_mask_times_the_scale_and_keeps_a_bool_mask():
    x = torch.randn(64, 33, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(2)
        y = lora_dropout(x, 0.2)
    g = torch.randn_like(y)
    y.backward(g)
    scale = LANES / (LANES - lane_threshold(0.2))
    torch.testing.assert_close(x.grad, g * (y != 0) * scale)
    assert [t.dtype for t in saved] == [torch.bool]  # 1 byte an element, not a float copy


def test_eval_no_op_and_tiny_p_keep_the_input():
    x = torch.randn(10, 10)
    assert lora_dropout(x, 0.5, training=False) is x
    assert lora_dropout(x, 0.0) is x
    assert lora_dropout(x, 1e-6) is x  # rounds to p = 0
    module = LoRADropout(0.5).eval()
    assert module(x) is x and isinstance(module, torch.nn.Dropout) and module.p == 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_off_the_cpu_it_is_torch_dropout():
    x = torch.randn(128, 64, device="cuda")
    torch.manual_seed(3)
    ours = lora_dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.1, True))
