"""LoRA+: B (and DoRA's magnitude) at `ratio` x A's learning rate; ratio 1 is plain AdamW, bit for bit."""

import json

import pytest
import torch
from lora_utils import randomize_lora, tokens
from train_utils import run_quick

import minilora
from minilora.training.checkpoint import load_training_state
from minilora.training.optim import lora_plus_groups, make_optimizer
from minilora.training.schedule import lr_at


def lora_model(model_dir, use_dora=False):
    torch.manual_seed(0)
    model = minilora.load_base(model_dir, quant="nf4")
    minilora.add_lora(model, r=4, alpha=8, dropout=0.0, use_dora=use_dora)
    randomize_lora(model)
    return model


def take_steps(model, optimizer, lrs):
    """AdamW steps on a fixed loss, the group lrs set as the training loop sets them."""
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)
        model(tokens()).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_groups_put_A_at_lr_and_B_and_magnitude_at_ratio_times_lr(tiny_model_dir, use_dora):
    layers = minilora.lora_layers(lora_model(tiny_model_dir("phi3"), use_dora)).values()
    group_a, group_b = lora_plus_groups(layers, lr=1e-3, ratio=16)
    assert group_a["lr"] == 1e-3 and group_b["lr"] == pytest.approx(1.6e-2)
    assert {id(p) for p in group_a["params"]} == {id(m.lora_A) for m in layers}
    expected_b = {id(m.lora_B) for m in layers} | ({id(m.lora_magnitude_vector) for m in layers} if use_dora else set())
    assert {id(p) for p in group_b["params"]} == expected_b
    optimizer = make_optimizer("adamw", [group_a, group_b], 1e-3, 0.0, torch.device("cpu"))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, pytest.approx(1.6e-2)]


def test_ratio_1_equals_plain_adamw_bit_for_bit(tiny_model_dir):
    plain, plus = lora_model(tiny_model_dir("phi3")), lora_model(tiny_model_dir("phi3"))
    cpu = torch.device("cpu")
    take_steps(plain, make_optimizer("adamw", minilora.lora_parameters(plain), 1e-3, 0.01, cpu), [1e-3, 5e-4, 2e-4])
    groups = lora_plus_groups(minilora.lora_layers(plus).values(), lr=1e-3, ratio=1.0)
    take_steps(plus, make_optimizer("adamw", groups, 1e-3, 0.01, cpu), [1e-3, 5e-4, 2e-4])
    for p, q in zip(minilora.lora_parameters(plain), minilora.lora_parameters(plus), strict=True):
        assert torch.equal(p, q)


def test_ratio_scales_only_Bs_first_adam_step(tiny_model_dir):
    cpu = torch.device("cpu")
    moved = {}
    for ratio in (1.0, 4.0):
        model = lora_model(tiny_model_dir("phi3"))
        before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        groups = lora_plus_groups(minilora.lora_layers(model).values(), lr=1e-3, ratio=ratio)
        take_steps(model, make_optimizer("adamw", groups, 1e-3, 0.0, cpu), [1e-3])
        moved[ratio] = {k: v.detach() - before[k] for k, v in model.named_parameters() if v.requires_grad}
    for name, step in moved[4.0].items():
        # Adam's first step is lr * g / (|g| + eps): linear in lr, so 4x for B and unchanged for A.
        # atol: the steps are differences of fp32 parameters of size ~1, exact to about one ulp (6e-8).
        factor = 4.0 if name.endswith("lora_B") else 1.0
        torch.testing.assert_close(step, factor * moved[1.0][name], rtol=1e-5, atol=2e-7)


@pytest.mark.slow
def test_training_run_records_the_ratio_and_steps_B_at_ratio_times_the_schedule(tmp_path):
    out = tmp_path / "out"
    assert run_quick(out, max_steps=3, save_every=3, lora_plus_ratio=4.0) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["lora_plus_ratio"] == 4.0
    assert "- LoRA+ ratio: 4 (B's learning rate = 4 x A's" in (out / "README.md").read_text()
    groups = load_training_state(out / "checkpoints" / "step-3")["optimizer"]["param_groups"]
    last_lr = lr_at(2, run["config"]["lr"], run["result"]["warmup_steps"], 3, run["config"]["min_lr_ratio"])
    assert [g["lr"] for g in groups] == [pytest.approx(last_lr), pytest.approx(4 * last_lr)]
