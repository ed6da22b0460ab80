"""Recomputing decoder layers in backward (and offloading what it keeps) changes memory, not numbers."""

import os

import pytest
import torch
from train_utils import demo_batch, lora_grads

import minilora
from minilora.attention import use_varlen_attention
from minilora.training.offload import OffloadSaved
from minilora.training.recompute import (
    Recomputed,
    activation_bytes_per_token,
    available_memory,
    choose_mode,
    enable_recompute,
)


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


def _tiny_lora_model():
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model, dropout=0.05)
    use_varlen_attention(model)  # as the job builds it: the probe passes position ids
    return model


def test_probe_measures_activations_per_token_and_leaves_rng_and_mode_alone():
    model = _tiny_lora_model().eval()
    rng = torch.get_rng_state()
    short = activation_bytes_per_token(model, torch.device("cpu"), tokens=32)
    long = activation_bytes_per_token(model, torch.device("cpu"), tokens=128)
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    # Per token it is about constant (attention keeps O(T)); at hidden 256 and 4 layers it is tens of KB:
    # more than the 4 layer inputs a full recompute keeps (4 x 256 x 4 bytes = 4 KB), less than 1 MB.
    assert 4 * 256 * 4 < short < 2**20
    assert long == pytest.approx(short, rel=0.25)


def test_auto_keeps_activations_on_a_cpu_when_they_fit_and_recomputes_when_not():
    model = _tiny_lora_model()
    cpu = torch.device("cpu")
    per_token = activation_bytes_per_token(model, cpu)
    fits = int(0.1 * available_memory(cpu) / per_token)
    mode, why = choose_mode(model, cpu, fits)
    assert mode == "none" and why.startswith("auto: none on a CPU") and "GB available" in why
    mode, why = choose_mode(model, cpu, fits * 10)  # ~100% of free memory: over the half auto allows
    assert mode == "full" and "over half" in why
    mode, _ = choose_mode(model, cpu, fits, processes=10)  # ten ranks share the memory
    assert mode == "full"


def test_available_memory_is_positive_and_below_the_machine_total():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_memory(torch.device("cpu")) <= total
