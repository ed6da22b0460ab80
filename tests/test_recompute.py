"""Recomputing decoder layers in backward (and offloading what it keeps) changes memory, not numbers."""

import pytest
import torch
from train_utils import demo_batch, lora_grads

import minilora
from minilora.training.offload import OffloadSaved
from minilora.training.recompute import Recomputed, enable_recompute


@pytest.mark.slow
@pytest.mark.parametrize("every,wrapped", [(1, 4), (2, 2)])  # all 4 layers; layers 0 and 2
def test_recompute_gives_the_same_loss_and_gradients(every, wrapped):
    """Checkpointing replays the RNG state on recompute: same dropout masks, same numbers."""
    batch = demo_batch()
    _, plain = lora_grads(batch)
    n, recomputed = lora_grads(batch, every=every)
    assert n == wrapped
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_offloaded_checkpoint_inputs_give_the_same_gradients():
    batch = demo_batch()
    _, plain = lora_grads(batch)

    class CountingOffload(OffloadSaved):
        def __init__(self):
            self.packed = []
            super().__init__(devices=("cpu",), min_numel=1)  # CPU stands in for CUDA here

        def _pack(self, t):
            self.packed.append(tuple(t.shape))
            return super()._pack(t)

    offload = CountingOffload()
    _, offloaded = lora_grads(batch, every=1, offload=offload)
    assert offload.packed.count((4, batch.input_ids.shape[1], 256)) >= 4  # each layer's input went through
    for a, b in zip(plain, offloaded, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_adapter_names_never_show_the_recompute_wrapper():
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model)
    enable_recompute(model)
    assert isinstance(model.model.layers[0], Recomputed)
    assert next(iter(minilora.lora_layers(model))) == "model.layers.0.self_attn.o_proj"


def test_recompute_wrapper_is_transparent_in_eval():
    layer = torch.nn.Linear(4, 4)
    wrapped = Recomputed(layer).eval()
    x = torch.randn(2, 4)
    assert torch.equal(wrapped(x), layer(x))
