"""`train.py --init`: the run records its init, saves pissa/olora adapters converted, and a resumed run
rebuilds the init's base from the initial factors in the checkpoint, continuing bit for bit."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_utils import QUICK, run_quick

import minilora.inject
from minilora.errors import UserError
from minilora.training.config import TrainConfig, validate
from minilora.training.metrics import read_metrics


@pytest.mark.slow
def test_pissa_resume_rebuilds_the_base_from_the_checkpoint_and_is_bit_identical(tmp_path, monkeypatch):
    assert run_quick(tmp_path / "a", init="pissa") == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # run b: a rolled back to its step-3 checkpoint
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-6")
    (tmp_path / "b" / "adapter_model.safetensors").unlink()

    def no_recompute(*args, **kwargs):
        raise AssertionError("a resumed run must take A0, B0 from its checkpoint, not compute them again")

    monkeypatch.setattr(minilora.inject, "initial_factors", no_recompute)
    assert run_quick(tmp_path / "b", resume=True, init="pissa") == 0
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [m["loss"] for m in read_metrics(tmp_path / run / "metrics.jsonl") if m["kind"] == "train"]
    assert losses("a") == losses("b") and len(losses("b")) == 6


@pytest.mark.slow
def test_olora_run_records_the_init_and_saves_the_converted_adapter(tmp_path):
    out = tmp_path / "run"
    assert run_quick(out, init="olora", max_steps=2, eval_every=0, save_every=0) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["init"]["method"] == "olora" and run["init"]["converted"] is True
    assert run["init"]["saved_r"] == 16 and run["init"]["saved_alpha"] == 32
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 32, True)
    a = load_file(out / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]
    assert a.shape[0] == 16
    card = (out / "README.md").read_text()
    assert "LoRA init: `olora`" in card and "path_initial_model_for_weight_conversion" in card


@pytest.mark.parametrize("overrides,message", [
    (dict(init="svd"), "--init"),
    (dict(init="olora:3"), "only pissa"),
    (dict(init="pissa", dora=True), "--dora"),
    (dict(init="loftq", quant="none"), "quantization error"),
])
def test_bad_init_flags_are_one_line_before_loading(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        validate(TrainConfig(**{**QUICK, "output": str(tmp_path), **overrides}))
