"""The streaming loader (minilora/stream_load.py) builds the model that transformers' from_pretrained followed by
add_lora and quantize_linears built before it: same modules, same bytes (packed 4-bit weights and their
statistics, LoRA factors, norms, embeddings, computed buffers), same config, same logits; and it reads the
checkpoint layer by layer whatever the order of the tensors in the files."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import SMALL, TINY_CONFIGS
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

import minilora
from minilora import stream_load
from minilora.errors import UserError
from minilora.inject import add_lora, lora_parameters
from minilora.quant import Quantizer, quantize_linears
from minilora.training.recompute import decoder_layers

CPU, F32 = torch.device("cpu"), torch.float32
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
           "gpt_neox": ["query_key_value", "dense_4h_to_h"]}


def save(folder, config, max_shard_size=None) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=F32)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return str(folder)


def reference(path: str, quant: str, lora: dict | None) -> torch.nn.Module:
    """The loading path before streaming, step by step: the whole model from transformers, LoRA on the
    full-precision weights, then every other linear layer quantized."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=F32)
    quantizer = Quantizer(quant, True, F32, CPU) if quant != "none" else None
    if lora is not None:
        add_lora(model, **lora, quantizer=quantizer)
    if quantizer is not None:
        quantize_linears(model, quant, True, F32, CPU)
        model.is_loaded_in_4bit = True
    model.requires_grad_(False)
    for p in lora_parameters(model) if lora is not None else []:
        p.requires_grad_(True)
    model.config.use_cache = False
    return model


def streamed(path: str, quant: str, lora: dict | None, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return minilora.load_base(path, quant=quant, compute_dtype=F32, device=CPU, lora=lora, **kw)


def assert_same_model(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    assert ([(n, type(m), m.training) for n, m in ours.named_modules()]
            == [(n, type(m), m.training) for n, m in ref.named_modules()])
    ours_state, ref_state = ours.state_dict(), ref.state_dict()  # 4-bit layers add their quant statistics
    assert list(ours_state) == list(ref_state)
    for key, value in ref_state.items():
        assert ours_state[key].dtype == value.dtype and torch.equal(ours_state[key], value), key
    ours_buffers, ref_buffers = dict(ours.named_buffers()), dict(ref.named_buffers())  # non-persistent too
    assert list(ours_buffers) == list(ref_buffers)
    for key, value in ref_buffers.items():
        assert ours_buffers[key].dtype == value.dtype and torch.equal(ours_buffers[key], value), key
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert p.requires_grad == q.requires_grad, name
    tied = [(ours.get_output_embeddings().weight is ours.get_input_embeddings().weight),
            (ref.get_output_embeddings().weight is ref.get_input_embeddings().weight)]
    assert tied[0] == tied[1]
    assert ours.config.to_dict() == ref.config.to_dict()
    assert ours.generation_config.to_dict() == ref.generation_config.to_dict()
    assert getattr(ours, "is_loaded_in_4bit", False) == getattr(ref, "is_loaded_in_4bit", False)
    x = torch.randint(1, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    logits = []
    for model in (ours, ref):
        torch.manual_seed(2)  # the LoRA layers are in training mode (as add_lora made them): the same dropout masks
        with torch.no_grad():
            logits.append(model(x).logits)
    assert torch.equal(*logits)


@pytest.mark.parametrize("arch,tied,shard,quant", [
    ("llama", False, None, "nf4"),
    ("llama", True, "20KB", "nf4"),
    ("phi3", False, None, "none"),
    ("gpt_neox", False, "20KB", "nf4"),
])
def test_streamed_base_equals_transformers_then_quantized(tmp_path, arch, tied, shard, quant):
    config = TINY_CONFIGS[arch]()
    config.tie_word_embeddings = tied
    path = save(tmp_path / "m", config, shard)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists() == (shard is not None)
    lora = dict(r=4, alpha=8, targets=TARGETS[arch])
    ours = streamed(path, quant, lora)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == tied
    assert_same_model(ours, reference(path, quant, lora))


@pytest.mark.parametrize("arch,quant", [("phi3", "nf4"), ("gpt_neox", "none"), ("llama", "none")])
def test_streamed_plain_base_equals_transformers(tmp_path, arch, quant):
    path = save(tmp_path / "m", TINY_CONFIGS[arch]())
    assert_same_model(streamed(path, quant, None), reference(path, quant, None))


@pytest.mark.parametrize("init,quant", [("loftq", "nf4"), ("pissa", "nf4"), ("olora", "nf4"), ("pissa:2", "nf4"),
                                        ("pissa", "none")])
def test_streamed_lora_inits_equal_the_old_path(tiny_model_dir, init, quant):
    """The init is computed from each target's full-precision weight as it is read: the same factors and the
    same (residual) base as when the whole model was loaded first."""
    lora = dict(r=4, alpha=8, init=init)
    ours, ref = streamed(tiny_model_dir("phi3"), quant, lora), reference(tiny_model_dir("phi3"), quant, lora)
    assert_same_model(ours, ref)  # A, B, initial_A/B (buffers), the packed residual base


def _write_interleaved(folder, config) -> None:
    """The model's tensors over two shards: layer 1 and every norm (layer 0's too) in the first file the index
    names, the rest in the second; so layer 0 is split over both files, and reading file by file would finish
    layer 1 first."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=F32)
    config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    first = {k: v for k, v in state.items() if ".layers.1." in k or k.endswith("norm.weight")}
    second = {k: v for k, v in state.items() if k not in first}
    save_file(first, folder / "a.safetensors", metadata={"format": "pt"})
    save_file(second, folder / "b.safetensors", metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(first, "a.safetensors"), **dict.fromkeys(second, "b.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_layers_load_one_after_another_whatever_the_file_order(tmp_path, monkeypatch):
    """on_layer(i) sees layer i complete (4-bit, LoRA in place, frozen but LoRA) while every later layer is
    still on the meta device: no more than one layer is ever being read."""
    config = LlamaConfig(**SMALL, num_key_value_heads=2)
    _write_interleaved(tmp_path, config)
    found = {}  # the model's layer list, as the loader finds it
    monkeypatch.setattr(stream_load, "decoder_layers", lambda m: found.setdefault("layers", decoder_layers(m)))
    seen = []

    def on_layer(index, layer):
        assert layer is found["layers"][index]
        assert all(not t.is_meta for t in [*layer.parameters(), *layer.buffers()])
        assert type(layer.self_attn.k_proj).__name__ == "Linear4bit"
        assert type(layer.self_attn.q_proj).__name__ == "LoRALinear"
        assert layer.self_attn.q_proj.lora_A.requires_grad and not layer.input_layernorm.weight.requires_grad
        later = [t for i in range(index + 1, len(found["layers"])) for t in found["layers"][i].parameters()]
        assert all(t.is_meta for t in later) and (later or index == len(found["layers"]) - 1)
        seen.append(index)

    def on_embeddings(module):  # the input embeddings, loaded, before any layer is read
        assert module is found["model"].get_input_embeddings()
        assert all(not t.is_meta for t in module.parameters()) and not module.weight.requires_grad
        assert all(t.is_meta for layer in found["layers"] for t in layer.parameters())
        seen.append(type(module).__name__)

    skeleton = stream_load.skeleton
    monkeypatch.setattr(stream_load, "skeleton", lambda *args: found.setdefault("model", skeleton(*args)))
    lora = dict(r=4, alpha=8, targets=["q_proj"])
    ours = streamed(str(tmp_path), "nf4", lora, on_layer=on_layer, on_embeddings=on_embeddings)
    assert seen == ["Embedding", 0, 1]
    assert_same_model(ours, reference(str(tmp_path), "nf4", lora))


@pytest.mark.slow
def test_old_checkpoint_names_load_as_transformers_loads_them(tmp_path):
    """A GPT-NeoX checkpoint with the buffers older versions saved (attention masks, rotary inv_freq), and a
    Llama checkpoint saved from the base model (no `model.` prefix, no lm_head, tied embeddings)."""
    neox = save(tmp_path / "neox", GPTNeoXConfig(**SMALL))
    state = load_file(tmp_path / "neox" / "model.safetensors")
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, tmp_path / "neox" / "model.safetensors", metadata={"format": "pt"})
    assert_same_model(streamed(neox, "nf4", None), reference(neox, "nf4", None))

    llama = save(tmp_path / "llama", LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    state = load_file(tmp_path / "llama" / "model.safetensors")
    bare = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
    save_file(bare, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    handed = []  # tied embeddings and head are one tensor: the embeddings are not handed over alone
    assert_same_model(streamed(llama, "nf4", None, on_embeddings=handed.append), reference(llama, "nf4", None))
    assert handed == []


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}), "has no place for"),
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "lacks 1 weight"),
    (lambda s: s.update({"model.norm.weight": torch.ones(3)}), "model.norm.weight is \\[3\\]"),
    (lambda s: s.pop("lm_head.weight"), "lacks 1 weight.*lm_head.weight"),  # untied: the head is needed
])
def test_tensors_that_do_not_fit_are_a_user_error(tmp_path, change, message):
    path = save(tmp_path, LlamaConfig(**SMALL, num_key_value_heads=2))
    state = load_file(tmp_path / "model.safetensors")
    change(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"^base model {path}: .*{message}"):
        minilora.load_base(path, device=CPU)


def test_a_bin_checkpoint_is_loaded_whole_by_transformers(tmp_path):
    path = save(tmp_path, TINY_CONFIGS["phi3"]())
    state = load_file(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    seen = []
    with pytest.warns(UserWarning, match="loaded by transformers' from_pretrained.*no model.safetensors"):
        ours = streamed(path, "nf4", dict(r=4, alpha=8), on_layer=lambda i, layer: seen.append(i),
                        on_embeddings=lambda module: seen.append(type(module).__name__))
    assert seen == ["Embedding", *range(ours.config.num_hidden_layers)]  # all once the whole model is loaded
    with warnings.catch_warnings():
        assert_same_model(ours, reference(path, "nf4", dict(r=4, alpha=8)))


HUB_LOAD = """
import torch, minilora
from minilora.model_files import local_model_folder
torch.manual_seed(0)
by_id = minilora.load_base("someorg/tiny-llama", compute_dtype=torch.float32, device="cpu")
torch.manual_seed(0)
by_folder = minilora.load_base(str(local_model_folder("someorg/tiny-llama")), compute_dtype=torch.float32, device="cpu")
assert by_id.config._name_or_path == "someorg/tiny-llama"
a, b = by_id.state_dict(), by_folder.state_dict()
assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
print("ok", type(by_id.model.layers[0].self_attn.q_proj).__name__)
"""


@pytest.mark.slow
def test_a_hub_id_streams_from_the_hugging_face_cache(tmp_path):
    """A hub id's files are found through transformers' cached_file (here offline, in a hand-made cache: the
    layout huggingface_hub writes), the same snapshot the digests of model_files.py read."""
    snapshot = tmp_path / "hub" / "models--someorg--tiny-llama" / "snapshots" / ("0" * 40)
    save(snapshot, LlamaConfig(**SMALL, num_key_value_heads=2), "20KB")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", HUB_LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok Linear4bit")
