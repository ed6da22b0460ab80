"""Nothing non-finite is written as a result or reported as success: an update that leaves non-finite weights
is undone, a run none of whose updates could be applied fails, a non-finite evaluation is an error, and
metrics.jsonl is strict JSON."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_utils import DEMO, argv_for, run_quick

import minilora.training.loop
from minilora.builtin import resolve_builtin
from minilora.training.cli import run
from minilora.training.metrics import append_metric, read_metrics


def _strict(path):
    """Every line of a JSON-lines file parsed by a strict reader (bare NaN/Infinity refused)."""
    def refuse(constant):
        raise AssertionError(f"bare {constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_metrics_lines_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metric(path, {"kind": "eval", "loss": float("nan"), "ppl": float("inf"),
                         "modules": {"a": {"update_norm": float("-inf"), "grad": [1.5, float("nan")]}}})
    assert _strict(path) == [{"kind": "eval", "loss": None, "ppl": None,
                              "modules": {"a": {"update_norm": None, "grad": [1.5, None]}}}]


def _poison_updates(monkeypatch, steps):
    """After these optimizer steps (numbered from 1) one LoRA weight holds inf, as an overflowing update leaves it."""
    step, calls = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in steps:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


@pytest.mark.slow
def test_an_update_that_leaves_non_finite_weights_is_undone_and_logged(tmp_path, monkeypatch):
    _poison_updates(monkeypatch, {2})
    out = tmp_path / "out"
    assert run_quick(out, max_steps=4, save_every=2, eval_every=0) == 0
    steps = [m for m in _strict(out / "metrics.jsonl") if m["kind"] == "train"]
    assert [m.get("skipped") for m in steps] == [None, "non-finite weights after the update (undone)", None, None]
    for folder in (out, out / "checkpoints" / "step-2", out / "checkpoints" / "step-4"):
        assert all(torch.isfinite(t).all() for t in load_file(folder / "adapter_model.safetensors").values())


@pytest.mark.slow
def test_a_run_none_of_whose_updates_applied_is_not_success(tmp_path, monkeypatch, capsys):
    """--lr 1e308 did this: every update overflowed, the weights were inf, and the run ended with exit 0."""
    _poison_updates(monkeypatch, {1, 2})
    out = tmp_path / "out"
    assert run(argv_for(out, DEMO, "--max-steps=2", "--eval-every=0")) == 1
    err = capsys.readouterr().err
    assert "none of the 2 optimizer steps of this run could be applied" in err and "--lr" in err
    assert not (out / "adapter_model.safetensors").exists() and not (out / "eval.json").exists()
    _strict(out / "metrics.jsonl")


@pytest.mark.slow
def test_a_non_finite_final_evaluation_is_an_error_and_no_adapter_is_written(tmp_path, monkeypatch, capsys):
    evaluate, calls = minilora.training.loop.evaluate, []

    def nan_after(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        calls.append(1)
        return {**result, "loss": float("nan"), "ppl": float("nan")} if len(calls) == 2 else result

    monkeypatch.setattr(minilora.training.loop, "evaluate", nan_after)
    out = tmp_path / "out"
    assert run(argv_for(out, DEMO, "--max-steps=2", "--eval-every=0")) == 1
    err = capsys.readouterr().err
    assert "the held-out loss is nan at step 2 (after evaluation)" in err
    assert not (out / "adapter_model.safetensors").exists() and not (out / "eval.json").exists()
    assert all(m.get("loss") is not None for m in _strict(out / "metrics.jsonl") if m["kind"] == "eval")


def test_a_base_model_that_computes_nan_is_refused_before_training(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(resolve_builtin("tiny-phi3"), model)
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if k.endswith("input_layernorm.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert run(argv_for(out, DEMO, "--model", str(model), "--max-steps=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --model {model}: the held-out loss of the base model before training is nan")
    assert not (out / "adapter_model.safetensors").exists() and not read_metrics(out / "metrics.jsonl")
