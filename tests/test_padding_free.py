"""Padding-free batching: the row plan, the layout, logits and losses equal to unpadded examples."""

import random

import pytest
import torch
from test_batching import PAD, X, _per_example_logits, make_examples
from train_utils import DEMO, quick_config

import minilora
from minilora.attention import use_varlen_attention, varlen_available
from minilora.builtin import build_model, build_tokenizer
from minilora.data.batching import epoch_order, make_batches, make_padding_free_batches, plan_padding_free_rows
from minilora.data.dataset import load_dataset
from minilora.training.distributed import DistInfo, shard
from minilora.training.evaluate import evaluate
from minilora.training.loop import TrainingLoop, epoch_batches
from minilora.training.loss import loss_sum


def test_plan_takes_examples_in_order_until_either_limit():
    assert plan_padding_free_rows([3, 3, 3, 3, 3], max_examples=2, max_tokens=100) == [[0, 1], [2, 3], [4]]
    assert plan_padding_free_rows([4, 5, 2, 6, 1], max_examples=10, max_tokens=10) == [[0, 1], [2, 3, 4]]
    # An example over the budget is never dropped: it gets a row of its own.
    assert plan_padding_free_rows([3, 12, 3], max_examples=4, max_tokens=10) == [[0], [1], [2]]
    assert plan_padding_free_rows([], 4, 10) == []
    with pytest.raises(ValueError, match="max_examples"):
        plan_padding_free_rows([3], 0, 10)


def test_layout_is_one_row_without_padding_and_targets_match_padded():
    examples = make_examples([5, 7, 4, 9, 3, 6, 8], n_prompt=2)
    free = make_padding_free_batches(examples, batch_size=3, batch_tokens=18, epoch=1, seed=3, pad_id=PAD)
    padded = make_batches(examples, 3, epoch=1, seed=3, pad_id=PAD)
    order = epoch_order(len(examples), 1, 3)
    assert [line for b in free for line in b.lines[0]] == [i + 1 for i in order]  # all, once, in epoch order
    for b in free:
        assert b.input_ids.shape[0] == 1 and b.attention_mask is None
        assert len(b.lines[0]) <= 3 and b.input_ids.shape[1] <= 18
        assert b.n_tokens == b.input_ids.numel()  # not one pad token
        start = 0
        for line in b.lines[0]:
            ex = examples[line - 1]
            n = len(ex.input_ids)
            assert b.input_ids[0, start:start + n].tolist() == ex.input_ids
            assert b.position_ids[0, start:start + n].tolist() == list(range(n))
            assert b.labels[0, start:start + n].tolist() == [X] + ex.labels[1:]
            start += n
    # The first token of an example is never a shifted target, so nothing is lost against padding.
    assert sum(b.n_target_tokens for b in free) == sum(b.n_target_tokens for b in padded)
    assert sum(b.n_tokens for b in free) == sum(b.n_tokens for b in padded)


def test_batches_are_a_pure_function_of_seed_and_epoch():
    examples = make_examples([3, 9, 4, 6, 8, 5, 7, 4, 6, 4, 3])
    full = make_padding_free_batches(examples, 3, 14, epoch=2, seed=5, pad_id=PAD)
    torch.manual_seed(123)
    random.seed(123)
    again = make_padding_free_batches(examples, 3, 14, epoch=2, seed=5, pad_id=PAD)
    assert [b.lines for b in full] == [b.lines for b in again]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(full, again, strict=True))


def test_rows_per_rank_shard_to_one_row_each():
    examples = make_examples([5, 7, 4, 9, 3, 6, 8])
    batches = make_padding_free_batches(examples, 2, 100, epoch=0, seed=0, pad_id=PAD, rows_per_batch=2)
    assert [b.input_ids.shape[0] for b in batches] == [2, 2]  # 4 rows of up to 2 examples, 2 per micro-batch
    for b in batches:
        parts = [shard(b, DistInfo(rank, 2)) for rank in range(2)]
        assert [p.lines for p in parts] == [(b.lines[0],), (b.lines[1],)]
        assert sum(p.n_target_tokens for p in parts) == b.n_target_tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager", "minilora"])
@pytest.mark.parametrize("window", [None, 5])
def test_padding_free_logits_equal_unpacked(attn, window):
    """sdpa/eager: transformers builds a block-diagonal causal mask from the restarting positions;
    minilora: minilora.attention's per-example attention (the CPU side of the varlen path).
    `window`: a sliding window shorter than some examples (Phi-3 has one)."""
    model = build_model(seed=0)
    model.config.sliding_window = window
    examples = make_examples([9, 4, 12, 6, 3, 7, 10], seed=1)
    reference = _per_example_logits(model, examples)  # sdpa, one example at a time
    if attn == "minilora":
        use_varlen_attention(model)
    else:
        model.config._attn_implementation = attn
    batches = make_padding_free_batches(examples, 3, 30, epoch=0, seed=0, pad_id=PAD)
    assert any(len(b.lines[0]) > 1 for b in batches)
    assert_rows_match(model, batches, examples, reference, atol=1e-5, rtol=0)


def assert_rows_match(model, batches, examples, reference, **tolerance):
    """Each example's logits inside the batch rows == its logits computed alone (`reference`)."""
    device = model.get_input_embeddings().weight.device
    for b in batches:
        with torch.no_grad():
            logits = model(**b.to(device).model_inputs()).logits.float()  # (B, T, V)
        for row, lines in enumerate(b.lines):
            start = 0
            for line in lines:
                n = len(examples[line - 1].input_ids)
                torch.testing.assert_close(logits[row, start:start + n], reference[line - 1], **tolerance)
                start += n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's varlen attention needs a CUDA GPU")
def test_varlen_attention_logits_equal_unpacked():
    device = torch.device("cuda")
    if not varlen_available(device, torch.bfloat16):
        pytest.skip("no varlen attention kernel for this GPU or torch")
    model = build_model(seed=0).to(device, torch.bfloat16)
    examples = make_examples([9, 4, 12, 6, 3, 7, 10], seed=1)
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([e.input_ids], device=device)).logits[0].float()
                     for e in examples]  # sdpa, one example at a time
    use_varlen_attention(model)
    batches = make_padding_free_batches(examples, 3, 30, epoch=0, seed=0, pad_id=PAD, rows_per_batch=2)
    assert_rows_match(model, batches, examples, reference, atol=3e-2, rtol=3e-2)


def lora_model(dropout=0.0, base="builtin:tiny-phi3"):
    torch.manual_seed(0)
    model = minilora.load_base(base)
    minilora.add_lora(model, dropout=dropout)
    for p in minilora.lora_parameters(model):  # B = 0 at init: move it so the adapter matters
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_eval_loss_does_not_depend_on_the_layout(tmp_path, small_chat_model):
    tokenizer = build_tokenizer()
    examples = load_dataset(DEMO, tokenizer, 128).examples[:24]
    model = lora_model(base=small_chat_model)
    results = {}
    for layout in ("padding", "padding_free", "packing"):
        cfg = quick_config(tmp_path, batch_size=4, padding=layout == "padding", packing=layout == "packing")
        results[layout] = evaluate(model, epoch_batches(examples, cfg, 0, tokenizer.pad_token_id))
    assert results["padding"]["tokens"] == results["padding_free"]["tokens"] == results["packing"]["tokens"]
    for layout in ("padding_free", "packing"):
        assert results[layout]["loss"] == pytest.approx(results["padding"]["loss"], rel=1e-5)


def test_accumulated_gradients_do_not_depend_on_rows_per_micro_batch(tmp_path, small_chat_model):
    """One step of 1 x 8 examples == 2 x 4 == 4 x 2 (padding-free rows of different lengths):
    each micro-batch's loss sum is divided by the step's target-token count."""
    tokenizer = build_tokenizer()
    examples = load_dataset(DEMO, tokenizer, 128).examples[:64]
    grads = []
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = quick_config(tmp_path / f"o{batch_size}", batch_size=batch_size, grad_accum=accum, dropout=0.0)
        loop = TrainingLoop(lora_model(base=small_chat_model), cfg, train_examples=examples, eval_batches=[],
                            pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), precision="fp32",
                            fingerprint={})
        micro = [loop.stream.next() for _ in range(accum)]
        assert all(b.input_ids.shape[0] == 1 and len(b.lines[0]) == batch_size for b in micro)
        n_targets = sum(b.n_target_tokens for b in micro)
        for b in micro:
            (loss_sum(loop.model, b) / n_targets).backward()
        grads.append([p.grad.clone() for p in loop.params])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_varlen_attention_is_used_only_where_it_is_exact():
    model = build_model(seed=0)
    model.config.attention_dropout = 0.1  # the kernel has no dropout: transformers' mask path stays
    assert not use_varlen_attention(model) and model.config._attn_implementation == "sdpa"
    model.config.attention_dropout = 0.0
    assert use_varlen_attention(model) and model.config._attn_implementation == "minilora_varlen"
