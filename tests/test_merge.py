"""Merge and export: the merged model computes what the unmerged LoRA model computes, and saves as a
plain Hugging Face checkpoint (the base's own key names, no LoRA, no 4-bit, no quantization_config)."""

import json
import os
import runpy
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from lora_utils import randomize_lora, save_random_adapter, tokens
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import minilora
from minilora.lock import LOCK_NAME, FolderLock
from minilora.merge import main, merge_adapter
from minilora.run_record import TrainedBase, read_trained_base

# fp32: the merged model runs the same math with W + s·BA pre-summed, differing only in fp32 rounding
# (dequantized fp32 weights vs bnb's dequantize + fp32 matmul on the 4-bit base are the same numbers).
FP32_TOL = dict(atol=1e-5, rtol=1e-4)
# bf16: every activation is rounded to 8 mantissa bits through two layers; rtol is torch's bf16 default,
# atol covers logits near zero. Observed max error ~4.4e-3 on logits of magnitude ~0.6.
BF16_TOL = dict(atol=1e-2, rtol=1.6e-2)


def merged_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(tokens()).logits.float()


def tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_merged_fp32_equals_lora_on_full_precision_base(tiny_model_dir, tmp_path):
    adapter, lora_logits = save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter", quant="none")
    out = merge_adapter(adapter, tmp_path / "merged", dtype=torch.float32, quant="none")
    torch.testing.assert_close(merged_logits(out), lora_logits, **FP32_TOL)


@pytest.mark.parametrize("targets", [None, ["o_proj"]], ids=["all-targets", "o_proj-only"])
def test_merged_fp32_equals_lora_on_nf4_base(tiny_model_dir, tmp_path, targets):
    # With o_proj only, the other three projections are 4-bit layers without LoRA: dequantized too.
    adapter, lora_logits = save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter", "nf4", targets)
    out = merge_adapter(adapter, tmp_path / "merged", dtype=torch.float32, quant="nf4")
    with torch.no_grad():
        base_logits = minilora.load_base(tiny_model_dir("phi3")).eval()(tokens()).logits
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # the update is there to be kept
    torch.testing.assert_close(merged_logits(out), lora_logits, **FP32_TOL)


def test_bf16_export_is_the_fp32_merge_rounded_once(tiny_model_dir, tmp_path):
    adapter, lora_logits = save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter", quant="nf4")
    fp32 = tensors(merge_adapter(adapter, tmp_path / "fp32", dtype=torch.float32, quant="nf4"))
    out = merge_adapter(adapter, tmp_path / "bf16", dtype="bf16", quant="nf4")
    bf16 = tensors(out)
    assert bf16.keys() == fp32.keys()
    for key, value in bf16.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, fp32[key].to(torch.bfloat16)), key
    torch.testing.assert_close(merged_logits(out), lora_logits, **BF16_TOL)


def test_output_is_a_plain_hf_model_with_the_base_key_names(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("phi3")
    adapter, _ = save_random_adapter(base_dir, tmp_path / "adapter", quant="nf4")
    out = merge_adapter(adapter, tmp_path / "merged", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    base_keys = tensors(Path(base_dir)).keys()
    assert tensors(out).keys() == base_keys  # no base_layer, no lora_A/B, nothing packed
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert not any(isinstance(m, (bnb.nn.Linear4bit, minilora.LoRALinear)) for m in model.modules())
    assert not getattr(model, "is_quantized", False)


def test_quant_is_read_from_the_training_runs_run_json(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": {"quant": "fp4"}, "compute_dtype": "torch.bfloat16",
                                              "double_quant": False}))
    expected = TrainedBase(quant="fp4", double_quant=False, compute_dtype="bfloat16", source=str(run / "run.json"))
    assert read_trained_base(run) == expected
    assert read_trained_base(run / "checkpoints" / "step-4") == expected
    assert read_trained_base(tmp_path / "elsewhere") == TrainedBase(quant="nf4", double_quant=True,
                                                                    compute_dtype=None, source="default")


def test_full_precision_run_merges_on_its_full_precision_base(tiny_model_dir, tmp_path):
    # No --quant: run.json says the adapter was trained on an unquantized base, so merging must not
    # dequantize-from-nf4 (which would shift every weight by NF4 rounding).
    adapter, lora_logits = save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter", quant="none")
    (adapter / "run.json").write_text(json.dumps({"config": {"quant": "none"}, "compute_dtype": "torch.float32"}))
    out = merge_adapter(adapter, tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(merged_logits(out), lora_logits, **FP32_TOL)


def test_cli_missing_adapter_is_one_error_line(tmp_path, run_command):
    code, out, err = run_command(main, ["--adapter", str(tmp_path / "nope"), "--output", str(tmp_path / "m")])
    assert code == 2 and out == ""
    assert err == f"error: {tmp_path / 'nope'}: no such adapter folder\n"


def test_cli_bad_dtype_is_one_error_line(tmp_path, run_command):
    code, _, err = run_command(main, ["--adapter", str(tmp_path), "--output", str(tmp_path / "m"), "--dtype", "int8"])
    assert code == 2 and err == "error: --dtype 'int8': expected one of bf16, fp16, fp32\n"


def test_cli_refuses_a_non_empty_output_and_the_adapter_folder(tiny_model_dir, tmp_path, run_command):
    adapter, _ = save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter", quant="none")
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, _, err = run_command(main, ["--adapter", str(adapter), "--output", str(output)])
    assert code == 2 and err.startswith("error: --output") and "--overwrite" in err and err.count("\n") == 1
    assert (output / "keep.txt").read_text() == "mine"
    code, _, err = run_command(main, ["--adapter", str(adapter), "--output", str(adapter), "--overwrite"])
    assert code == 2 and "which the merge reads" in err
    assert (adapter / "adapter_config.json").is_file()


@pytest.mark.parametrize("size", ["lots", "0", "-5GB"])
def test_cli_bad_shard_size_is_refused_before_merging(tmp_path, run_command, size):
    argv = ["--adapter", str(tmp_path), "--output", str(tmp_path / "m"), f"--max-shard-size={size}"]
    code, _, err = run_command(main, argv)
    assert code == 2 and err == f"error: --max-shard-size {size!r}: expected a positive size such as 5GB or 500MB\n"


def test_cli_refuses_an_output_another_merge_is_writing(tiny_model_dir, tmp_path, run_command):
    adapter, _ = save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter", quant="none")
    output = tmp_path / "merged"
    with FolderLock(tmp_path / f".merged{LOCK_NAME}", "--output"):
        code, _, err = run_command(main, ["--adapter", str(adapter), "--output", str(output)])
    assert code == 2 and err.startswith(f"error: --output {output} is in use by another run (pid {os.getpid()} ")
    assert err.count("\n") == 1 and not output.exists()


def test_cli_adapter_not_fitting_the_model_leaves_no_output(tiny_model_dir, tmp_path, run_command):
    adapter, _ = save_random_adapter(tiny_model_dir("phi3"), tmp_path / "adapter", quant="none")  # hidden 64
    output = tmp_path / "merged"
    argv = ["--adapter", str(adapter), "--output", str(output), "--model", "builtin:tiny-phi3"]
    code, _, err = run_command(main, argv)
    assert code == 2 and err.startswith(f"error: {adapter / 'adapter_model.safetensors'}: no tensor for")
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing half-written


# runpy warns that the module it runs as __main__ was imported already (by this file): expected here.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_module_cli_merges_builtin_with_tokenizer_and_overwrite(tmp_path, capsys, monkeypatch):
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model)
    randomize_lora(model)
    minilora.save_adapter(model, tmp_path / "adapter")
    output = tmp_path / "merged"
    output.mkdir()
    (output / "old.txt").write_text("replaced")
    # `python -m minilora.merge ...`, run in this process (a fresh interpreter costs ~10 s here).
    argv = ["--adapter", str(tmp_path / "adapter"), "--output", str(output), "--overwrite"]
    monkeypatch.setattr(sys, "argv", ["minilora.merge", *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("minilora.merge", run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "merged: 16 LoRA layers" in out and f"from_pretrained({str(output)!r})" in out
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "old.txt" not in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
