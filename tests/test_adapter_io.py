"""Adapters on disk: PEFT loads ours, we load PEFT's, bad adapters fail loudly."""

import json

import pytest
import torch
from lora_utils import ATOL, RTOL, save_random_adapter, tokens
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import minilora
from minilora.errors import AdapterError, UserError


@pytest.fixture
def trained_adapter(tiny_model_dir, tmp_path):
    """A phi3 LoRA model with non-zero B saved to tmp_path/adapter, and its logits."""
    return save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter")


def test_saved_files_follow_peft_format(trained_adapter):
    folder, _ = trained_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert config["use_rslora"] is False and config["base_model_name_or_path"]
    tensors = load_file(folder / "adapter_model.safetensors")
    assert len(tensors) == 2 * 4 * 2  # 2 layers x 4 modules x (A, B)
    a = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert a.shape == (8, 64) and b.shape == (192, 8) and a.dtype == torch.float32
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*"))


def test_peft_from_pretrained_reproduces_our_logits(trained_adapter, tiny_model_dir):
    folder, ours = trained_adapter
    base = minilora.load_base(tiny_model_dir("phi3"))
    with torch.no_grad():
        base_logits = base(tokens()).logits
        peft_model = PeftModel.from_pretrained(base, str(folder))
        peft_logits = peft_model(tokens()).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapter really loaded
    torch.testing.assert_close(peft_logits, ours, atol=ATOL, rtol=RTOL)


def test_load_adapter_reproduces_our_logits_on_a_fresh_base(trained_adapter, tiny_model_dir):
    folder, ours = trained_adapter
    model = minilora.load_base(tiny_model_dir("phi3"))
    names = minilora.load_adapter(model, folder)
    assert len(names) == 8
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, ours)


def test_load_adapter_reads_peft_saved_adapters(tiny_model_dir, tmp_path):
    base = minilora.load_base(tiny_model_dir("llama"))
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["o_proj", "down_proj"],
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.eval()
    with torch.no_grad():
        peft_logits = peft_model(tokens()).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = minilora.load_base(tiny_model_dir("llama"))
    minilora.load_adapter(ours, tmp_path / "peft")
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()).logits, peft_logits, atol=ATOL, rtol=RTOL)


def test_adapter_write_is_atomic_on_failure(trained_adapter, monkeypatch):
    folder, _ = trained_adapter
    before = (folder / "adapter_model.safetensors").read_bytes()
    import minilora.adapter as adapter_mod

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_mod, "save_file", boom)
    model = minilora.load_base(adapter_mod.read_adapter_config(folder)["base_model_name_or_path"])
    minilora.add_lora(model)
    with pytest.raises(OSError):
        minilora.save_adapter(model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert not list(folder.glob("*.tmp"))


# --- bad adapters: each a clear AdapterError naming the problem -------------------------------------

def _fresh(tiny_model_dir):
    return minilora.load_base(tiny_model_dir("phi3"))


def test_missing_adapter_files_are_named(trained_adapter, tiny_model_dir, tmp_path):
    folder, _ = trained_adapter
    with pytest.raises(AdapterError, match="no such adapter folder"):
        minilora.load_adapter(_fresh(tiny_model_dir), tmp_path / "nowhere")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)


def test_wrong_rank_in_config_is_a_shape_error_naming_the_key(trained_adapter, tiny_model_dir):
    folder, _ = trained_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"lora_A.weight has shape \[8, 64\], the model needs \[4, 64\]"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)


def test_renamed_keys_are_unexpected_not_silently_ignored(trained_adapter, tiny_model_dir):
    folder, _ = trained_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace("base_model.model.", "base_model.model.default."): v for k, v in tensors.items()}
    save_file(renamed, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="matches no LoRA layer"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)


def test_missing_key_is_named(trained_adapter, tiny_model_dir):
    folder, _ = trained_adapter
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no tensor for 'base_model.model.model.layers.1.mlp.down_proj.lora_B"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)


def test_corrupt_safetensors_is_a_clear_error(trained_adapter, tiny_model_dir):
    folder, _ = trained_adapter
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)


def test_config_that_does_not_fit_the_model(trained_adapter, tiny_model_dir):
    folder, _ = trained_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no module of Phi3ForCausalLM matches the LoRA targets"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)


@pytest.mark.parametrize("key,value", [("use_rslora", "false"), ("use_rslora", 1), ("use_dora", "no")])
def test_config_booleans_must_be_json_booleans(trained_adapter, tiny_model_dir, key, value):
    """bool("false") is True: a string would silently switch rsLoRA on; it is an error instead."""
    folder, _ = trained_adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=f"'{key}' must be true or false, got {value!r}"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)


def test_deeply_nested_config_is_a_clear_error(trained_adapter, tiny_model_dir):
    folder, _ = trained_adapter
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterError, match="not valid JSON"):
        minilora.load_adapter(_fresh(tiny_model_dir), folder)
