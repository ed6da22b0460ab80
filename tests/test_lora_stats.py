"""--log-lora-stats: per-module update and gradient norms from the factors, checked against dense
references and against the inspector on the saved adapter."""

import pytest
from lora_utils import randomize_lora, tokens
from train_utils import run_quick

import minilora
from minilora.inspect import inspect
from minilora.training.lora_stats import LoRAStats
from minilora.training.run_plots import read_metrics


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_norms_equal_the_dense_update_and_the_gradients(tiny_model_dir, use_dora):
    model = minilora.load_base(tiny_model_dir("phi3"), quant="nf4")
    minilora.add_lora(model, r=4, alpha=8, dropout=0.0, use_dora=use_dora)
    randomize_lora(model)
    model(tokens()).logits.pow(2).mean().backward()
    stats = LoRAStats(model, every=1)
    record = stats.record(7, stats.grad_norms())
    layers = minilora.lora_layers(model)
    assert record["kind"] == "lora_stats" and record["step"] == 7 and list(record["modules"]) == list(layers)
    for name, layer in layers.items():
        row = record["modules"][name]
        assert row["update_norm"] == pytest.approx(layer.delta_weight().double().norm().item(), rel=1e-5)
        for param, value in layer.adapter_params().items():
            assert row[f"grad_{param}"] == pytest.approx(value.grad.norm().item(), rel=1e-5)
        assert ("grad_lora_magnitude_vector" in row) == use_dora


@pytest.mark.slow
def test_training_logs_every_n_steps_and_plots(tmp_path):
    out = tmp_path / "out"
    assert run_quick(out, max_steps=4, save_every=4, log_lora_stats=2) == 0
    records = [m for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "lora_stats"]
    assert [r["step"] for r in records] == [2, 4]
    final = inspect(out)["modules"]
    assert sorted(records[-1]["modules"]) == [m["name"] for m in final]
    for module in final:  # the last logged norm is the saved adapter's
        assert records[-1]["modules"][module["name"]]["update_norm"] == pytest.approx(module["delta_fro"], rel=1e-4)
    assert all(v["grad_lora_B"] > 0 for v in records[0]["modules"].values())
    assert (out / "lora_stats.png").read_bytes()[:4] == b"\x89PNG"
