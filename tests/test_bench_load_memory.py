"""The load-memory benchmark writes its checkpoint by hand: it must be one transformers reads as it reads its own."""

import torch
from conftest import SMALL
from transformers import AutoModelForCausalLM

import minilora
from benchmarks.load_memory import model_bytes, write_model


def test_hand_written_checkpoint_loads_in_transformers_and_minilora(tmp_path):
    folder = write_model(tmp_path, dict(SMALL, num_key_value_heads=2), shards=2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    weight = ref.model.layers[1].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and 0.015 < weight.std() < 0.025  # drawn at 0.02, not left empty
    assert torch.equal(ref.model.norm.weight, torch.ones(SMALL["hidden_size"]))
    ours = minilora.load_base(str(folder), quant="none", compute_dtype=torch.float32, device="cpu")
    assert torch.equal(ours.model.layers[1].mlp.up_proj.weight, weight)
    assert model_bytes(ours) == 4 * sum(p.numel() for p in ref.parameters()) + sum(
        b.numel() * b.element_size() for b in ref.buffers())
