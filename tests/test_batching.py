"""Epoch order and collation: determinism, resume, exact target counts, packing == no packing."""

import random

import pytest
import torch
import torch.nn.functional as F

from minilora.builtin import build_model
from minilora.data.batching import IGNORE_INDEX, epoch_order, make_batches, seeded_permutation
from minilora.data.examples import Example

X = IGNORE_INDEX
PAD = 259


def make_examples(lengths, n_prompt=2, seed=0) -> list[Example]:
    """Random byte-token examples; the first `n_prompt` tokens of each are an untrained prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for line, n in enumerate(lengths, start=1):
        assert n > n_prompt  # n_prompt=0 is the text format: labels[0] is a token too
        ids = torch.randint(3, 259, (n,), generator=g).tolist()
        out.append(Example(ids, [X] * n_prompt + ids[n_prompt:], line))
    return out


def test_seeded_permutation_is_pinned():
    # Fixed values: a change here would silently reshuffle every resumed run.
    assert seeded_permutation(10, "pin") == [6, 0, 8, 5, 1, 9, 2, 3, 4, 7]
    assert epoch_order(8, 0, 0) == [0, 2, 3, 4, 1, 6, 5, 7]
    assert epoch_order(8, 1, 0) == [3, 5, 1, 0, 6, 7, 4, 2]


def test_epoch_order_is_a_fresh_permutation_per_epoch_and_seed():
    orders = {(e, s): epoch_order(50, e, s) for e in range(3) for s in range(2)}
    for order in orders.values():
        assert sorted(order) == list(range(50))
    assert len({tuple(o) for o in orders.values()}) == len(orders)
    assert epoch_order(0, 0, 0) == [] and epoch_order(1, 5, 5) == [0]


def test_padding_batch_layout_and_target_count():
    examples = make_examples([5, 7, 4], n_prompt=2)
    (batch,) = make_batches(examples, batch_size=3, epoch=0, seed=0, pad_id=PAD)
    order = epoch_order(3, 0, 0)
    assert batch.lines == tuple((order[i] + 1,) for i in range(3))
    assert batch.input_ids.shape == (3, 7)
    for row, i in enumerate(order):
        ex, n = examples[i], len(examples[i].input_ids)
        assert batch.input_ids[row].tolist() == ex.input_ids + [PAD] * (7 - n)
        assert batch.labels[row].tolist() == ex.labels + [X] * (7 - n)
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (7 - n)
    assert batch.position_ids.tolist() == [list(range(7))] * 3
    # Shifted targets: lengths minus the 2 prompt tokens each.
    assert batch.n_target_tokens == (5 - 2) + (7 - 2) + (4 - 2)
    assert batch.n_tokens == 5 + 7 + 4


def test_batches_are_pure_so_resume_by_index_matches():
    examples = make_examples([3, 9, 4, 6, 8, 5, 7, 4, 6, 4, 3])
    for packing in (False, True):
        full = make_batches(examples, 2, epoch=1, seed=7, pad_id=PAD, packing=packing, seq_len=16)
        # A resumed process has other global RNG state; the batches must not depend on it.
        torch.manual_seed(999)
        random.seed(999)
        resumed = make_batches(examples, 2, epoch=1, seed=7, pad_id=PAD, packing=packing, seq_len=16)[2:]
        assert len(resumed) == len(full) - 2
        for a, b in zip(full[2:], resumed, strict=True):
            assert a.lines == b.lines
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.position_ids, b.position_ids)
    other_epoch = make_batches(examples, 2, epoch=2, seed=7, pad_id=PAD)
    assert [b.lines for b in other_epoch] != [b.lines for b in make_batches(examples, 2, 1, 7, PAD)]


def test_packing_layout():
    examples = make_examples([5, 4, 6, 3, 7], n_prompt=0)
    batches = make_batches(examples, batch_size=2, epoch=0, seed=0, pad_id=PAD, packing=True, seq_len=10)
    order = epoch_order(5, 0, 0)
    seen = [line for b in batches for row in b.lines for line in row]
    assert seen == [i + 1 for i in order]  # every example once, in epoch order
    assert any(len(row) > 1 for b in batches for row in b.lines)
    for b in batches:
        assert b.attention_mask is None
        assert b.input_ids.shape[1] <= 10
        for row, lines in enumerate(b.lines):
            start = 0
            for line in lines:
                ex = examples[line - 1]
                n = len(ex.input_ids)
                assert b.input_ids[row, start : start + n].tolist() == ex.input_ids
                assert b.position_ids[row, start : start + n].tolist() == list(range(n))
                # The example's first token is never a target of the previous example.
                assert b.labels[row, start : start + n].tolist() == [X] + ex.labels[1:]
                start += n
            assert (b.labels[row, start:] == X).all() and (b.input_ids[row, start:] == PAD).all()
            assert b.position_ids[row, start:].tolist() == list(range(b.input_ids.shape[1] - start))
    assert sum(b.n_target_tokens for b in batches) == sum(e.n_targets for e in examples) == 25 - 5
    assert sum(b.n_tokens for b in batches) == 25


def test_packing_argument_errors():
    examples = make_examples([5, 12])
    with pytest.raises(ValueError, match="packing needs seq_len"):
        make_batches(examples, 2, 0, 0, PAD, packing=True)
    with pytest.raises(ValueError, match="example from line 2 has 12 tokens > seq_len 10"):
        make_batches(examples, 2, 0, 0, PAD, packing=True, seq_len=10)
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(examples, 0, 0, 0, PAD)


def _per_example_logits(model, examples):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples]  # each (T_i, V)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_logits_equal_unpacked(attn):
    model = build_model(seed=0)
    model.config._attn_implementation = attn
    examples = make_examples([9, 4, 12, 6, 3, 7, 10], seed=1)
    reference = _per_example_logits(model, examples)
    for packing in (True, False):
        batches = make_batches(examples, 2, epoch=0, seed=0, pad_id=PAD, packing=packing, seq_len=24)
        assert any(len(row) > 1 for b in batches for row in b.lines) == packing
        seen = 0
        for b in batches:
            with torch.no_grad():
                logits = model(**b.model_inputs()).logits  # (B, T, V)
            for row, lines in enumerate(b.lines):
                start = 0
                for line in lines:
                    n = len(examples[line - 1].input_ids)
                    torch.testing.assert_close(logits[row, start : start + n], reference[line - 1], atol=1e-5, rtol=0)
                    start += n
                    seen += 1
        assert seen == len(examples)


def test_packed_token_sum_loss_equals_per_example_sum():
    model = build_model(seed=0)
    examples = make_examples([9, 4, 12, 6, 3], n_prompt=0, seed=2)
    with torch.no_grad():
        expected = sum(
            F.cross_entropy(logits[:-1], torch.tensor(e.labels[1:]), ignore_index=X, reduction="sum")
            for logits, e in zip(_per_example_logits(model, examples), examples, strict=True)
        )
        total, n_targets = 0.0, 0
        for b in make_batches(examples, 4, 0, 0, PAD, packing=True, seq_len=20):
            logits = model(**b.model_inputs()).logits[:, :-1]  # (B, T-1, V)
            total += F.cross_entropy(logits.transpose(1, 2), b.labels[:, 1:], ignore_index=X, reduction="sum")
            n_targets += b.n_target_tokens
    assert n_targets == sum(len(e.input_ids) - 1 for e in examples)
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-6)
