"""Recomputing decoder layers in backward (and offloading what it keeps) changes memory, not numbers."""

import pytest
import torch
from train_utils import demo_batch, lora_grads

import minilora
from minilora.attention import use_varlen_attention
from minilora.training.config import TrainConfig
from minilora.training.loop import max_micro_batch_tokens
from minilora.training.memory import available_memory
from minilora.training.offload import OffloadSaved
from minilora.training.recompute import Recomputed, activation_bytes, choose_mode, enable_recompute


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


def _tiny_lora_model(dora=False):
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model, dropout=0.05, use_dora=dora)
    use_varlen_attention(model)  # as the job builds it: the probe passes position ids
    return model


def test_probe_separates_per_token_from_fixed_activations_and_leaves_rng_and_mode_alone():
    model = _tiny_lora_model().eval()
    rng = torch.get_rng_state()
    fixed, per_token = activation_bytes(model, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    # Tens of KB a token at hidden 256 and 4 layers: more than the 4 layer inputs a full recompute keeps
    # (4 x 256 x 4 bytes), less than 1 MB; next to nothing that does not grow with the tokens.
    assert 4 * 256 * 4 < per_token < 2**20
    assert fixed < 16 * per_token
    # DoRA with dropout keeps each layer's dequantized weight: a fixed cost, not a per-token one.
    dora_fixed, dora_per_token = activation_bytes(_tiny_lora_model(dora=True), torch.device("cpu"))
    weights = sum(layer.in_features * layer.out_features * 4 for layer in minilora.lora_layers(model).values())
    assert dora_fixed >= 0.9 * weights
    assert dora_per_token < 2 * per_token


def test_auto_keeps_activations_on_a_cpu_when_they_fit_and_recomputes_when_not():
    model = _tiny_lora_model()
    cpu = torch.device("cpu")
    fixed, per_token = activation_bytes(model, cpu)
    fits = int((0.1 * available_memory(cpu) - fixed) / per_token)
    mode, why = choose_mode(model, cpu, fits)
    assert mode == "none" and why.startswith("auto: none on a CPU") and "GiB available" in why
    mode, why = choose_mode(model, cpu, fits * 10)  # ~100% of free memory: over the half auto allows
    assert mode == "full" and "over half" in why
    mode, _ = choose_mode(model, cpu, fits, processes=10)  # ten ranks share the memory
    assert mode == "full"
    assert choose_mode(torch.nn.Linear(2, 2), cpu, 8)[1].startswith("auto: full on a CPU (the activation probe failed")
    # Layers sharded while loading (--fsdp) are not probed: a forward through them before the root's is refused.
    assert choose_mode(torch.nn.Linear(2, 2), cpu, 8, sharded=True) == (
        "full", "auto: full on a CPU under --fsdp (the activation probe cannot run sharded layers)")


@pytest.mark.parametrize("flags,tokens", [
    ({}, 4 * 512),  # batch_size x seq_len
    ({"batch_tokens": 1000}, 1000),
    ({"batch_tokens": 100}, 512),  # a row still takes one example over the budget
    ({"batch_tokens": 10**6}, 4 * 512),  # batch_size examples at most
    ({"batch_tokens": 1000, "padding": True}, 4 * 512),
])
def test_micro_batch_token_bound(flags, tokens):
    cfg = TrainConfig(data="x.jsonl", batch_size=4, seq_len=512, **flags)
    assert max_micro_batch_tokens(cfg) == tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_is_selective_on_a_gpu_without_probing():
    model = torch.nn.Linear(2, 2)  # the probe would fail on it: on CUDA none runs
    mode, why = choose_mode(model, torch.device("cuda"), 10**9)
    assert mode == "selective" and why.startswith("auto: selective on a GPU")
    assert available_memory(torch.device("cuda")) > 0
