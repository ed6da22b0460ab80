"""Our LoRA layer against PEFT on the same 4-bit base: outputs, gradients, initial state."""

import pytest
import torch
from lora_utils import ATOL, RTOL, draw_masks_as_minilora, randomize_lora, tokens
from peft import LoraConfig, get_peft_model

import minilora
from minilora.adapter import peft_key

ARCHS = ["phi3", "llama", "gpt_neox"]
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
           "llama": ["o_proj", "down_proj"],
           "gpt_neox": ["query_key_value"]}
def copy_into_peft(ours, peft_model):
    peft_state = peft_model.state_dict()
    with torch.no_grad():
        for name, layer in minilora.lora_layers(ours).items():
            for p in ("lora_A", "lora_B"):
                key = peft_key(name, p).replace(f".{p}.weight", f".{p}.default.weight")
                peft_state[key].copy_(getattr(layer, p))


def peft_lora(model_dir, dropout, rslora=False, r=8):
    base = minilora.load_base(model_dir, quant="nf4")
    cfg = LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules=minilora.DEFAULT_TARGETS,
                     use_rslora=rslora, task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_lora_grads_equal_peft_on_4bit_base(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    ours = minilora.load_base(path, quant="nf4")
    names = minilora.add_lora(ours, r=8, alpha=16, dropout=0.05)
    assert sorted({n.rpartition(".")[2] for n in names}) == sorted(TARGETS[arch])
    randomize_lora(ours)
    ref = draw_masks_as_minilora(peft_lora(path, dropout=0.05))
    copy_into_peft(ours, ref)
    ours.train()
    ref.train()
    x = tokens()
    # Same seed, same module order: both draw identical dropout masks.
    torch.manual_seed(123)
    ours_logits = ours(x).logits
    torch.manual_seed(123)
    ref_logits = ref(x).logits
    torch.testing.assert_close(ours_logits, ref_logits, atol=ATOL, rtol=RTOL)
    ours_logits.float().pow(2).mean().backward()
    ref_logits.float().pow(2).mean().backward()
    ref_params = dict(ref.named_parameters())
    for name, layer in minilora.lora_layers(ours).items():
        for p in ("lora_A", "lora_B"):
            key = peft_key(name, p).replace(f".{p}.weight", f".{p}.default.weight")
            assert getattr(layer, p).grad is not None
            torch.testing.assert_close(getattr(layer, p).grad, ref_params[key].grad, atol=1e-6, rtol=1e-4)
    grads = [p for p in ours.parameters() if p.grad is not None]
    assert len(grads) == 2 * len(names)  # the base got no gradient


def test_zero_B_leaves_the_base_output_bit_identical(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("phi3"))
    x = tokens()
    with torch.no_grad():
        base_logits = model(x).logits
        minilora.add_lora(model)
        model.eval()
        assert torch.equal(model(x).logits, base_logits)


def test_disable_adapter_switch_gives_base_output_and_restores(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("phi3"))
    x = tokens()
    with torch.no_grad():
        base_logits = model(x).logits
        minilora.add_lora(model, dropout=0.0)
        randomize_lora(model)
        lora_logits = model(x).logits
        assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
        with minilora.disable_adapter(model):
            assert torch.equal(model(x).logits, base_logits)
        assert torch.equal(model(x).logits, lora_logits)


def test_rslora_scale_and_logits_equal_peft(tiny_model_dir):
    path = tiny_model_dir("phi3")
    ours = minilora.load_base(path)
    minilora.add_lora(ours, r=4, alpha=16, dropout=0.0, use_rslora=True)
    layer = next(iter(minilora.lora_layers(ours).values()))
    assert layer.scale == pytest.approx(16 / 2)  # alpha / sqrt(r)
    randomize_lora(ours)
    ref = peft_lora(path, dropout=0.0, rslora=True, r=4)
    copy_into_peft(ours, ref)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref(x).logits, atol=ATOL, rtol=RTOL)


def test_lora_parameters_are_fp32_with_peft_init(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("phi3"))
    minilora.add_lora(model, r=8)
    layer = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, minilora.LoRALinear)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (192, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in=64 gives U(-1/sqrt(64), 1/sqrt(64))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert "r=8, alpha=16, scale=2, dropout=0.05, base=nf4" in repr(layer)
