"""Epoch order and collation: examples -> padded or packed batches of tensors.

Everything here is a pure function of (examples, epoch, seed, ...): resuming at (epoch, batch index)
rebuilds the same batches and skips the first ones, so the data position is two integers.

Packing and attention. A packed row holds several examples back to back with `position_ids`
restarting at 0 at each example, and the batch carries no attention mask. transformers (5.x,
`masking_utils.find_packed_sequence_indices`) then reads the restarts as sequence boundaries and
builds a block-diagonal causal mask, for sdpa, eager, flex and flash attention alike. It only does so
when no cache is passed: a model called with `use_cache=True` (Phi-3's config default!) silently
lets examples attend to each other. `Batch.model_inputs()` therefore sets `use_cache=False`;
tests/test_batching.py pins packed logits to the unpacked ones.

Padding-free batching (the training default) uses the same layout: a micro-batch is one row per rank
holding its examples back to back, so no token is padding and the attention cost is that of the
examples themselves (`make_padding_free_batches`).
"""

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from minilora.data.dataset import Example

# The label value torch's cross_entropy skips by default; minilora.data.dataset re-exports it.
IGNORE_INDEX = -100


def seeded_permutation(n: int, key: str) -> list[int]:
    """A permutation of range(n) fixed by `key`, identical across Python versions and platforms.

    Fisher-Yates driven by `Random.random()`, the one method whose output Python promises not to
    change for a given seed (`random.shuffle`'s index drawing has changed before).
    """
    rng = random.Random(f"minilora:{key}")
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The order in which the `n` training examples are visited in `epoch` (a fresh shuffle each epoch)."""
    return seeded_permutation(n, f"epoch:{seed}:{epoch}")


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded with pad_id
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX on prompts, pads and (packed) example starts
    attention_mask: torch.Tensor | None  # (B, T) int64, 1 = token, 0 = pad; None when packed
    position_ids: torch.Tensor  # (B, T) int64, restarting at 0 at each packed example
    n_target_tokens: int  # (labels[:, 1:] != IGNORE_INDEX).sum(): the tokens the shifted loss counts
    n_tokens: int  # real tokens, padding excluded (for throughput)
    lines: tuple[tuple[int, ...], ...]  # per row, source line of each example in it

    def model_inputs(self) -> dict:
        """Keyword arguments for `model(**batch.model_inputs())`; labels stay out (the loop owns the loss)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            # Required for packing (see the module docstring), and a training step never needs a cache.
            "use_cache": False,
        }

    def to(self, device) -> "Batch":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            attention_mask=mask,
            position_ids=self.position_ids.to(device),
        )


def _pack(examples: list["Example"], seq_len: int) -> list[list["Example"]]:
    """Next-fit packing in the given order: start a new row when the next example does not fit."""
    rows, row, used = [], [], 0
    for ex in examples:
        if len(ex.input_ids) > seq_len:
            raise ValueError(f"example from line {ex.line} has {len(ex.input_ids)} tokens > seq_len {seq_len}")
        if row and used + len(ex.input_ids) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.input_ids)
    if row:
        rows.append(row)
    return rows


def _collate(rows: list[list["Example"]], pad_id: int, packed: bool) -> Batch:
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    ids, labels, positions, mask = [], [], [], []
    for row in rows:
        row_ids, row_labels, row_pos = [], [], []
        for ex in row:
            row_ids += ex.input_ids
            # In a packed row the first token of an example must not be a target: it would be
            # predicted from the end of the previous, unrelated example.
            row_labels += ([IGNORE_INDEX] + ex.labels[1:]) if packed else ex.labels
            row_pos += range(len(ex.input_ids))
        n_pad = width - len(row_ids)
        mask.append([1] * len(row_ids) + [0] * n_pad)
        # Packed: the padding gets positions 0.. of its own, i.e. it is one more (ignored) sequence.
        row_pos += range(n_pad) if packed else range(len(row_pos), width)
        ids.append(row_ids + [pad_id] * n_pad)
        labels.append(row_labels + [IGNORE_INDEX] * n_pad)
        positions.append(row_pos)
    labels_t = torch.tensor(labels, dtype=torch.long)
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=labels_t,
        attention_mask=None if packed else torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
        n_target_tokens=int((labels_t[:, 1:] != IGNORE_INDEX).sum()),
        n_tokens=sum(len(ex.input_ids) for row in rows for ex in row),
        lines=tuple(tuple(ex.line for ex in row) for row in rows),
    )


def make_batches(
    examples: list["Example"],
    batch_size: int,
    epoch: int,
    seed: int,
    pad_id: int,
    packing: bool = False,
    seq_len: int | None = None,
) -> list[Batch]:
    """All batches of one epoch, in order. The last batch may be smaller.

    Padding mode: `batch_size` examples per batch, padded to the longest. Packing mode: examples are
    packed (in shuffled order) into rows of at most `seq_len` tokens, `batch_size` rows per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ordered = [examples[i] for i in epoch_order(len(examples), epoch, seed)]
    if packing:
        if seq_len is None:
            raise ValueError("packing needs seq_len")
        rows = _pack(ordered, seq_len)
    else:
        rows = [[ex] for ex in ordered]
    return [_collate(rows[i : i + batch_size], pad_id, packing) for i in range(0, len(rows), batch_size)]


def plan_padding_free_rows(lengths: list[int], max_examples: int, max_tokens: int) -> list[list[int]]:
    """Split a sequence of example lengths into consecutive rows (lists of indices into `lengths`).

    A row takes examples in the given order until the next one would exceed `max_examples` examples or
    `max_tokens` tokens; an example longer than `max_tokens` gets a row of its own (never dropped).
    """
    if max_examples < 1 or max_tokens < 1:
        raise ValueError(f"max_examples and max_tokens must be >= 1, got {max_examples} and {max_tokens}")
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if row and (len(row) == max_examples or used + n > max_tokens):
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def make_padding_free_batches(
    examples: list["Example"],
    batch_size: int,
    batch_tokens: int,
    epoch: int,
    seed: int,
    pad_id: int,
    rows_per_batch: int = 1,
) -> list[Batch]:
    """All micro-batches of one epoch, padding-free: each row holds up to `batch_size` examples and
    `batch_tokens` tokens back to back, in epoch order, with restarting position ids (packed layout).

    `rows_per_batch` rows make one micro-batch: 1 on a single process; the number of ranks in data
    parallel training, so that each rank's shard is one row (rows of a micro-batch are padded to the
    longest of them; on one process there is no padding at all). The last micro-batch may have fewer rows.
    """
    ordered = [examples[i] for i in epoch_order(len(examples), epoch, seed)]
    plan = plan_padding_free_rows([len(ex.input_ids) for ex in ordered], batch_size, batch_tokens)
    rows = [[ordered[i] for i in row] for row in plan]
    return [_collate(rows[i : i + rows_per_batch], pad_id, packed=True) for i in range(0, len(rows), rows_per_batch)]
