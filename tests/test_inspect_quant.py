"""The inspector's quantization errors (`--model`) against references computed apart from it: bitsandbytes'
own NF4 of W, the Eckart-Young bound for LoftQ (the error left is the norm of E's singular values past r),
the training model's own residual base for PiSSA/OLoRA, and the saved adapter loaded by the ordinary path."""

import json

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

import minilora
from minilora.inspect import inspect, main
from minilora.lora import dequantize_weight
from minilora.run_record import RUN_FILE
from minilora.training.cli import run_cli

TARGETS = ["qkv_proj", "down_proj"]
REL = 1e-4


def adapter_with_run(path, folder, init, perturbed=True, r=4, alpha=8.0):
    """An adapter of `init` saved to `folder` with the run.json a training run would write; returns the
    model it was saved from (its base is the init's base)."""
    torch.manual_seed(0)
    model = minilora.load_base(path, compute_dtype=torch.float32, device="cpu",
                               lora=dict(r=r, alpha=alpha, dropout=0.0, targets=TARGETS, init=init))
    if perturbed:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in minilora.lora_layers(model).values():
                layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    minilora.save_adapter(model, folder, path)
    run = {"config": {"r": r, "alpha": alpha, "rslora": False, "quant": "nf4", "init": init},
           "init": {"method": init}, "compute_dtype": "torch.float32", "double_quant": True}
    (folder / RUN_FILE).write_text(json.dumps(run))
    return model


def full_weights(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def nf4_error(w):
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return (w - bnb.functional.dequantize_4bit(packed, state)).double()


def test_loftq_init_error_is_the_eckart_young_bound(tiny_model_dir, tmp_path):
    path = tiny_model_dir("phi3")
    adapter_with_run(path, tmp_path / "a", "loftq")
    full = full_weights(path)
    rows = inspect(tmp_path / "a", model=path)["modules"]
    assert len(rows) == 4
    for row in rows:
        w = full.get_submodule(row["name"]).weight.data
        error = nf4_error(w)
        norm_w = w.double().norm()
        assert row["quant_error"] == pytest.approx(float(error.norm() / norm_w), rel=1e-6)
        tail = torch.linalg.svdvals(error)[4:]  # the singular values a rank-4 fit leaves
        assert row["init_error"] == pytest.approx(float(tail.norm() / norm_w), rel=REL)
        assert row["init_cancelled"] == pytest.approx(1 - row["init_error"] / row["quant_error"], rel=1e-9)
        assert 0 < row["init_cancelled"] < 1


def test_randomized_loftq_reports_an_error_no_better_than_the_best_fit(tiny_model_dir, tmp_path):
    """loftq:N's report recomputes a randomized fit: it leaves at least the Eckart-Young tail, and less than
    the quantization error itself."""
    path = tiny_model_dir("phi3")
    adapter_with_run(path, tmp_path / "a", "loftq:2")
    full = full_weights(path)
    for row in inspect(tmp_path / "a", model=path)["modules"]:
        w = full.get_submodule(row["name"]).weight.data
        error = nf4_error(w)
        tail = float(torch.linalg.svdvals(error)[4:].norm() / w.double().norm())
        assert tail * (1 - 1e-6) <= row["init_error"] < row["quant_error"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_base_inits_report_their_training_models_error(tiny_model_dir, tmp_path, init):
    path = tiny_model_dir("phi3")
    model = adapter_with_run(path, tmp_path / "a", init)
    full = full_weights(path)
    fresh = minilora.load_base(path, compute_dtype=torch.float32, device="cpu")
    minilora.load_adapter(fresh, tmp_path / "a")  # the converted rank-8 adapter on the ordinary base
    for row in inspect(tmp_path / "a", model=path)["modules"]:
        w = full.get_submodule(row["name"]).weight.data.double()
        layer = minilora.lora_layers(model)[row["name"]]
        initial = (layer.initial_B @ layer.initial_A).double()
        start = dequantize_weight(layer.base_layer).double() + layer.scale * initial
        assert row["init_error"] == pytest.approx(float((w - start).norm() / w.norm()), rel=REL)
        loaded = minilora.lora_layers(fresh)[row["name"]]
        after = dequantize_weight(loaded.base_layer).double() + loaded.delta_weight().detach().double()
        assert row["trained_error"] == pytest.approx(float((w - after).norm() / w.norm()), rel=REL)
        assert row["rank"] == 8


def test_a_fresh_zeros_adapter_cancels_nothing_and_no_run_record_means_unknown_init(tiny_model_dir, tmp_path):
    path = tiny_model_dir("phi3")
    adapter_with_run(path, tmp_path / "a", "zeros", perturbed=False)
    for row in inspect(tmp_path / "a", model=path)["modules"]:
        assert row["init_error"] == row["quant_error"] == pytest.approx(row["trained_error"], rel=1e-9)
        assert row["init_cancelled"] == 0 and row["trained_cancelled"] == pytest.approx(0, abs=1e-9)
    (tmp_path / "a" / RUN_FILE).unlink()
    rows = inspect(tmp_path / "a", model=path)["modules"]
    assert all(row["init_error"] is None and row["init_cancelled"] is None for row in rows)


def test_cli_with_a_model_writes_the_quantization_plot_and_json_keys(tiny_model_dir, tmp_path):
    path = tiny_model_dir("phi3")
    adapter_with_run(path, tmp_path / "a", "loftq")
    code = run_cli(main, [str(tmp_path / "a"), "--model", path, "--json", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "r.png")])
    assert code == 0
    assert (tmp_path / "r-quant.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = json.loads((tmp_path / "r.json").read_text())["modules"][0]
    assert {"quant_error", "init_error", "trained_error", "init_cancelled", "trained_cancelled"} <= set(row)
