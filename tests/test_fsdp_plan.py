"""The FSDP memory plan (benchmarks/fsdp_plan.py) counts what minilora and bitsandbytes actually store."""

import json

import pytest
import torch
from conftest import TINY_CONFIGS
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM

import minilora
from benchmarks import fsdp
from benchmarks.fsdp_plan import CODE_TABLE_BYTES, Activations, LinearBytes, Settings, inventory, plan, skeleton
from minilora.attention import use_varlen_attention
from minilora.quant import quantize_linear, quantize_linears
from minilora.training.recompute import activation_bytes

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("out_features,in_features", [(192, 256), (320, 192)])  # 768 and 960 blocks
def test_nf4_bytes_match_a_real_bitsandbytes_layer(out_features, in_features):
    layer = quantize_linear(nn.Linear(in_features, out_features, bias=False), "nf4", True, torch.float32,
                            torch.device("cpu"))
    state = layer.weight.quant_state
    planned = LinearBytes(out_features * in_features)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == planned.packed
    assert state.absmax.dtype == torch.uint8 and state.state2.absmax.dtype == torch.float32
    assert state.absmax.numel() + 4 * state.state2.absmax.numel() == planned.statistics
    tables = sum(t.numel() * t.element_size() for t in (state.code, state.state2.code, state.offset))
    assert tables == CODE_TABLE_BYTES


def test_lora_count_matches_add_lora_on_a_real_model():
    config = TINY_CONFIGS["llama"]()
    settings = Settings(config, r=4, targets=LLAMA_TARGETS[1:])
    model = AutoModelForCausalLM.from_config(config)
    minilora.add_lora(model, r=4, targets=list(LLAMA_TARGETS[1:]))
    trainable, total = minilora.count_parameters(model)
    inv = inventory(config, settings)
    assert inv.lora == trainable
    weights = inv.layers * (sum(inv.layer_linears) + inv.layer_other) + inv.root
    assert weights == total - trainable  # every frozen weight is counted once, as 4-bit or bf16
    # The embeddings are a group of their own (training/fsdp.py) unless tied to the head, then the root holds both.
    for tied in (False, True):
        config.tie_word_embeddings = tied
        assert inventory(config, settings).embeddings == (0 if tied else config.vocab_size * config.hidden_size)


@pytest.mark.slow  # ~3.5 s on 2 cores
def test_the_probe_on_a_config_skeleton_sees_what_the_live_4bit_model_keeps():
    config = TINY_CONFIGS["llama"]()
    live = AutoModelForCausalLM.from_config(config)
    quantize_linears(live, "nf4", True, torch.float32, torch.device("cpu"))  # as load_base stores the base
    minilora.add_lora(live, dropout=0.05, targets=list(LLAMA_TARGETS))
    use_varlen_attention(live)  # as the job builds it
    _, live_per_token = activation_bytes(live, torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = skeleton(config, Settings(config, targets=LLAMA_TARGETS), None, torch.float32)
        _, planned_per_token = activation_bytes(fake, torch.device("cpu"))
    assert planned_per_token == pytest.approx(live_per_token, rel=0.02)


def test_sharded_lines_divide_by_the_gpus_and_offload_moves_them_to_the_host():
    config = TINY_CONFIGS["llama"]()
    acts = Activations(1000.0, 10.0, 100.0)  # given: this test is about the division, not the probe
    one = plan(Settings(config, gpus=1, targets=LLAMA_TARGETS), acts)
    four = plan(Settings(config, gpus=4, targets=LLAMA_TARGETS), acts)
    offloaded = plan(Settings(config, gpus=4, offload=True, targets=LLAMA_TARGETS), acts)
    sharded = ["NF4 packed weights (0.5 byte/weight)", "LoRA parameters (fp32)", "AdamW state (2 x fp32)"]
    for name in sharded:
        assert four.gpu[name] == pytest.approx(one.gpu[name] / 4)
        assert offloaded.host[name] == four.gpu[name] and name not in offloaded.gpu
    inv = one.inventory
    assert one.gpu["NF4 packed weights (0.5 byte/weight)"] == inv.layers * sum(n // 2 for n in inv.layer_linears)
    assert one.gpu["AdamW state (2 x fp32)"] == 8 * inv.lora
    kept = "activations kept (recompute full)"
    assert four.gpu[kept] == one.gpu[kept] == 1000 + 10 * 4 * 2048  # not sharded: each GPU runs its own batch


def test_help_and_a_bad_config_path(run_command, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        fsdp.main(["--help"])
    assert done.value.code == 0 and "--offload" in capsys.readouterr().out
    code, _, err = run_command(fsdp.main, ["--plan", "--config", str(tmp_path / "missing.json")])
    assert code == 2 and err.count("\n") == 1 and "missing.json" in err
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))  # no model_type
    code, _, err = run_command(fsdp.main, ["--plan", "--config", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "not a usable model config" in err
