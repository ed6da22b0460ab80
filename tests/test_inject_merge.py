"""Injection (matching, freezing, counting) and merging."""

import pytest
import torch
from lora_utils import randomize_lora, tokens
from transformers import AutoModelForCausalLM, Phi3Config

import minilora
from minilora.errors import UserError


def phi3_mini_config():
    # https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json
    return Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      tie_word_embeddings=False)


def test_phi3_mini_trainable_count_on_meta_matches_the_recipe_model_card():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(phi3_mini_config())
    assert minilora.count_parameters(model)[1] == 3_821_079_552
    names = minilora.add_lora(model, r=8, alpha=16, dropout=0.05)
    assert len(names) == 32 * 4
    trainable, total = minilora.count_parameters(model)
    assert trainable == 12_582_912
    assert total == 3_821_079_552 + 12_582_912
    assert minilora.trainable_summary(model) == "trainable 12,582,912 / 3,833,662,464 (0.33%)"


def test_4bit_weights_count_at_logical_size(tiny_model_dir):
    quantized = minilora.load_base(tiny_model_dir("phi3"), quant="nf4")
    plain = minilora.load_base(tiny_model_dir("phi3"), quant="none")
    assert minilora.count_parameters(quantized) == minilora.count_parameters(plain)
    qkv = quantized.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.numel() == 192 * 64 // 2  # packed storage: two weights a byte
    assert qkv.weight.quant_state.quant_type == "nf4" and qkv.weight.quant_state.nested


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"o_proj", "down_proj"}),
    ("mistral", {"o_proj", "down_proj"}),
    ("qwen2", {"o_proj", "down_proj"}),
    ("gpt_neox", {"query_key_value"}),
    ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
])
def test_default_targets_per_architecture(tiny_model_dir, arch, expected):
    model = minilora.load_base(tiny_model_dir(arch))
    names = minilora.add_lora(model)
    assert {n.rpartition(".")[2] for n in names} == expected
    assert len(names) == 2 * len(expected)  # two layers
    x = tokens()
    with torch.no_grad():
        assert model(x).logits.shape == (2, 12, 160)


def test_targets_match_like_peft_exact_suffix_or_regex(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("llama"))
    assert minilora.add_lora(model, targets=["layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    model = minilora.load_base(tiny_model_dir("llama"))
    names = minilora.add_lora(model, targets=r".*\.0\.self_attn\.(q|v)_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_suffix_must_follow_a_dot(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("llama"))
    with pytest.raises(UserError, match="matches the LoRA targets"):
        minilora.add_lora(model, targets=["proj"])  # "o_proj" ends with "proj" but not ".proj"


def test_nothing_matching_is_a_clear_error(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("gpt_neox"))
    with pytest.raises(UserError, match=r"no module of GPTNeoXForCausalLM matches .*linear layers it has: .*dense"):
        minilora.add_lora(model, targets=["qkv_proj"])


def test_non_linear_target_is_refused(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("phi3"))
    with pytest.raises(UserError, match="must be linear layers"):
        minilora.add_lora(model, targets=["input_layernorm"])


def test_merged_equals_unmerged_and_merge_is_idempotent(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("phi3"), quant="none")
    minilora.add_lora(model, dropout=0.0)
    randomize_lora(model)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x).logits
        original_w = model.model.layers[0].mlp.down_proj.base_layer.weight.clone()
        minilora.merge_lora(model)
        minilora.merge_lora(model)  # a second merge changes nothing
        merged = model(x).logits
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
        assert not torch.equal(model.model.layers[0].mlp.down_proj.base_layer.weight, original_w)
        minilora.unmerge_lora(model)
        minilora.unmerge_lora(model)
        torch.testing.assert_close(model.model.layers[0].mlp.down_proj.base_layer.weight, original_w,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-4)


def test_merging_into_4bit_is_refused_unless_dequantized(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("phi3"), quant="nf4")
    minilora.add_lora(model, dropout=0.0)
    randomize_lora(model)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x).logits
        with pytest.raises(UserError, match="without re-quantizing"):
            minilora.merge_lora(model)
        assert not any(m.merged for m in minilora.lora_layers(model).values())  # refused before any change
        with pytest.raises(UserError, match="without re-quantizing"):  # the same refusal, one layer at a time
            model.model.layers[0].self_attn.qkv_proj.merge()
        minilora.merge_lora(model, dequantize=True, dtype=torch.float32)
        layer = model.model.layers[0].self_attn.qkv_proj
        assert type(layer.base_layer) is torch.nn.Linear and layer.merged
        torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-4)


def test_our_4bit_quantization_equals_transformers_bitsandbytes_loading(tiny_model_dir):
    """load_base quantizes by itself (no Accelerate); the packed bytes and statistics must be exactly
    what transformers' BitsAndBytesConfig loading produces from the same checkpoint."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tiny_model_dir("phi3")
    ours = minilora.load_base(path, quant="nf4", double_quant=True, compute_dtype=torch.float32, device="cpu")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32, device_map="cpu")
    ours_state, ref_state = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert ours_state.keys() == ref_state.keys()
    qkv, ref_qkv = ours.model.layers[1].self_attn.qkv_proj.weight, ref.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv.data, ref_qkv.data)
    assert torch.equal(qkv.quant_state.absmax, ref_qkv.quant_state.absmax)
    assert torch.equal(qkv.quant_state.state2.absmax, ref_qkv.quant_state.state2.absmax)
    assert type(ours.lm_head) is torch.nn.Linear and ours.is_loaded_in_4bit
