"""The training loop end to end on the built-in tiny Phi-3 and the demo data."""

import json
import shutil

import pytest
import torch
from lora_utils import tokens
from peft import PeftModel
from safetensors.torch import load_file
from train_utils import DEMO, quick_config, run_quick

import minilora
from minilora.builtin import build_tokenizer
from minilora.data.dataset import load_dataset
from minilora.training.loop import TrainingLoop
from minilora.training.metrics import read_metrics
from minilora.training.schedule import lr_at


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert run_quick(out, max_steps=30, eval_every=10, save_every=10) == 0
    return out


@pytest.mark.slow
def test_loss_falls_and_held_out_perplexity_improves(trained):
    metrics = read_metrics(trained / "metrics.jsonl")
    train = [m["loss"] for m in metrics if m["kind"] == "train"]
    assert len(train) == 30
    assert sum(train[-5:]) / 5 < 0.8 * sum(train[:5]) / 5
    result = json.loads((trained / "eval.json").read_text())
    assert result["after"]["ppl"] < 0.5 * result["before"]["ppl"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 10, 20, 30]


@pytest.mark.slow
def test_output_folder_holds_every_promised_file(trained):
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "eval.json", "run.json",
                 "loss.png", "README.md"):
        assert (trained / name).is_file(), name
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-10", "step-20", "step-30"]
    first = read_metrics(trained / "metrics.jsonl")[1]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(first)
    card = (trained / "README.md").read_text()
    run = json.loads((trained / "run.json").read_text())
    assert "More Information Needed" not in card and "[Your" not in card
    assert "- LoRA rank: 8" in card and "- LoRA alpha: 16" in card and "- LoRA dropout: 0.05" in card
    assert f"{run['result']['eval_after']['ppl']:.2f}" in card
    assert '["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]' in card
    assert "PeftModel.from_pretrained(model, lora_adapter)" in card


@pytest.mark.slow
def test_trained_adapter_loads_in_peft_with_our_logits(trained):
    ours = minilora.load_base("builtin:tiny-phi3")
    minilora.load_adapter(ours, trained)
    base = minilora.load_base("builtin:tiny-phi3")
    x = tokens(vocab=256)
    with torch.no_grad():
        base_logits = base(x).logits
        peft_logits = PeftModel.from_pretrained(base, str(trained)).eval()(x).logits
        our_logits = ours.eval()(x).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-2)
    torch.testing.assert_close(peft_logits, our_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    assert run_quick(tmp_path / "a") == 0
    # Run b: a copy of a rolled back to its step-3 checkpoint, as if killed just after writing it.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-6")
    (tmp_path / "b" / "adapter_model.safetensors").unlink()
    assert run_quick(tmp_path / "b", resume=True) == 0
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [m["loss"] for m in read_metrics(tmp_path / run / "metrics.jsonl") if m["kind"] == "train"]
    assert losses("a") == losses("b") and len(losses("b")) == 6


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    with pytest.raises(minilora.UserError, match="no complete checkpoint"):
        run_quick(tmp_path / "empty", resume=True)


@pytest.mark.slow
def test_gradient_accumulation_is_normalised_by_target_tokens(tmp_path):
    """One step of 2 x 4 examples has the gradients of one step of 1 x 8 examples (same examples, same
    order). The gradients are compared as the optimizer receives them, not the weights after its step:
    AdamW divides by sqrt(v), so where a gradient is near zero it turns rounding differences into
    lr-sized ones, and how large those get depends on the CPU's summation order."""
    tokenizer = build_tokenizer()
    examples = load_dataset(DEMO, tokenizer, 128).examples[:64]
    grads = []
    for batch_size, accum in ((8, 1), (4, 2)):
        cfg = quick_config(tmp_path / f"o{batch_size}", batch_size=batch_size, grad_accum=accum, dropout=0.0)
        (tmp_path / f"o{batch_size}").mkdir()
        torch.manual_seed(0)
        model = minilora.load_base("builtin:tiny-phi3")
        minilora.add_lora(model, dropout=0.0)
        trainer = TrainingLoop(model, cfg, train_examples=examples, eval_batches=[], pad_id=tokenizer.pad_token_id,
                               device=torch.device("cpu"), precision="fp32", fingerprint={})
        seen = []

        def record_then_step(*args, step=trainer.optimizer.step, params=trainer.params, seen=seen, **kwargs):
            seen.append([p.grad.clone() for p in params])
            return step(*args, **kwargs)

        trainer.optimizer.step = record_then_step
        trainer.train_step()
        assert len(seen) == 1  # the step was applied
        grads.append(seen[0])
    for one, two in zip(*grads, strict=True):
        # The same fp32 terms summed in another grouping: they differ by a few float32 roundings of the
        # largest term (eps 1.2e-7), so 1e-5 of the largest entry bounds the difference with room to
        # spare; a per-micro-batch normalisation would be off by the token ratio of the micro-batches.
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5 * one.abs().max().item())
    assert max(g.abs().max() for g in grads[0]) > 0  # lora_B's gradients (lora_A's are 0 while B is 0)


def test_lr_schedule_is_a_pure_function_of_the_step():
    assert lr_at(0, 1.0, 4, 20) == 0.25 and lr_at(3, 1.0, 4, 20) == 1.0
    assert lr_at(4, 1.0, 4, 20) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_at(0, 1.0, 0, 20) == 1.0
