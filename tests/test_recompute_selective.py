"""Selective recompute: the same numbers as no recompute, without re-running the matrix products."""

import pytest
import torch
from test_padding_free import lora_model
from torch.utils._python_dispatch import TorchDispatchMode
from train_utils import DEMO

import minilora
from minilora.builtin import build_tokenizer
from minilora.data.batching import make_padding_free_batches
from minilora.data.dataset import load_dataset
from minilora.training.loss import loss_sum
from minilora.training.recompute import KEPT_OPS, Recomputed, enable_recompute


class CountOps(TorchDispatchMode):
    """Counts calls of the ops selective recompute keeps (matrix products, fused attention)."""

    def __init__(self):
        super().__init__()
        self.kept = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.kept += func in KEPT_OPS
        return func(*args, **(kwargs or {}))


def batch():
    tokenizer = build_tokenizer()
    examples = load_dataset(DEMO, tokenizer, 128).examples[:4]
    return make_padding_free_batches(examples, 4, 512, 0, 0, tokenizer.pad_token_id)[0]


def run(mode: str, the_batch):
    """(loss, LoRA grads, kept-op calls in forward + backward) with dropout on and fixed masks."""
    model = lora_model(dropout=0.05)
    if mode != "none":
        assert enable_recompute(model, mode=mode) == model.config.num_hidden_layers
    model.train()
    torch.manual_seed(1)
    with CountOps() as counter:
        loss = loss_sum(model, the_batch)
        loss.backward()
    return [loss.detach()] + [p.grad for p in minilora.lora_parameters(model)], counter.kept


def test_selective_recompute_matches_no_recompute_and_skips_the_products():
    b = batch()
    reference, calls_none = run("none", b)
    results = {mode: run(mode, b) for mode in ("full", "selective")}
    for mode, (values, _) in results.items():
        for a, v in zip(reference, values, strict=True):
            torch.testing.assert_close(v, a, atol=1e-6, rtol=1e-5, msg=mode)
    calls_full, calls_selective = results["full"][1], results["selective"][1]
    # Full recompute runs every product of the layers twice; selective runs them once, as no recompute.
    assert calls_selective == calls_none
    assert calls_full > calls_none


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="recompute mode"):
        Recomputed(torch.nn.Linear(2, 2), mode="some")
