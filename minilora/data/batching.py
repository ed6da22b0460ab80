"""Epoch order and collation: examples -> padded or packed batches of tensors, built when asked for.

Everything here is a pure function of (examples, epoch, seed, ...): resuming at (epoch, batch index)
rebuilds the same batches and skips the first ones, so the data position is two integers. An epoch's
plan is two integer arrays (the order and the row boundaries); a batch's tensors exist only while it
is used, so the batches of an epoch never sit in memory together.

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

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from minilora.data.examples import IGNORE_INDEX, Examples, as_examples, count_targets, seeded_permutation

__all__ = ["IGNORE_INDEX", "Batch", "EpochBatches", "epoch_order", "make_batches", "make_padding_free_batches",
           "plan_padding_free_rows", "seeded_permutation"]


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The order in which the `n` training examples are visited in `epoch` (a fresh shuffle each epoch)."""
    return seeded_permutation(n, f"epoch:{seed}:{epoch}")


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded with pad_id
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX on prompts, pads and (packed) example starts
    attention_mask: torch.Tensor | None  # (B, T) int64, 1 = token, 0 = pad; None when packed
    position_ids: torch.Tensor  # (B, T) int64, restarting at 0 at each packed example
    n_target_tokens: int  # count_targets(labels): the tokens the shifted loss counts
    n_tokens: int  # real tokens, padding excluded (for throughput): sum(row_tokens)
    lines: tuple[tuple[int, ...], ...]  # per row, source line of each example in it
    row_tokens: tuple[int, ...] = ()  # per row, real tokens (padding excluded)

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


def _row_bounds(examples: Examples, order: np.ndarray, packing: bool, seq_len: int | None) -> np.ndarray:
    """Row r holds order[bounds[r]:bounds[r + 1]]. Packing is next-fit in the given order: a new row
    starts when the next example does not fit in `seq_len`."""
    if not packing:
        return np.arange(len(order) + 1, dtype=np.int64)
    if seq_len is None:
        raise ValueError("packing needs seq_len")
    lengths = examples.lengths[order].tolist()
    bounds, used = [0], 0
    for k, n in enumerate(lengths):
        if n > seq_len:
            line = int(examples.lines[order[k]])
            raise ValueError(f"example from line {line} has {n} tokens > seq_len {seq_len}")
        if k > bounds[-1] and used + n > seq_len:
            bounds.append(k)
            used = 0
        used += n
    if lengths:
        bounds.append(len(lengths))
    return np.array(bounds, dtype=np.int64)


def _collate(examples: Examples, rows: list[np.ndarray], pad_id: int, packed: bool) -> Batch:
    row_tokens = [int(examples.lengths[row].sum()) for row in rows]
    width = max(row_tokens)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (B, T)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    positions = np.empty((len(rows), width), dtype=np.int64)  # (B, T)
    mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, T)
    for r, row in enumerate(rows):
        start = 0
        for i in row.tolist():
            ex_ids, ex_labels = examples.arrays(i)
            n = len(ex_ids)
            ids[r, start : start + n] = ex_ids
            labels[r, start : start + n] = ex_labels
            if packed:
                # The first token of a packed example must not be a target: it would be predicted from
                # the end of the previous, unrelated example.
                labels[r, start] = IGNORE_INDEX
            positions[r, start : start + n] = np.arange(n)
            start += n
        mask[r, :start] = 1
        # Packed: the padding gets positions 0.. of its own, i.e. it is one more (ignored) sequence.
        positions[r, start:] = np.arange(width - start) if packed else np.arange(start, width)
    labels_t = torch.from_numpy(labels)
    return Batch(
        input_ids=torch.from_numpy(ids),
        labels=labels_t,
        attention_mask=None if packed else torch.from_numpy(mask),
        position_ids=torch.from_numpy(positions),
        n_target_tokens=count_targets(labels_t),
        n_tokens=sum(row_tokens),
        lines=tuple(tuple(int(x) for x in examples.lines[row]) for row in rows),
        row_tokens=tuple(row_tokens),
    )


class EpochBatches(Sequence):
    """The batches of one epoch, in order, each collated when indexed (the last may be smaller)."""

    def __init__(self, examples: Examples, order: np.ndarray, bounds: np.ndarray, batch_size: int, pad_id: int,
                 packed: bool):
        self.examples, self.order, self.bounds = examples, order, bounds
        self.batch_size, self.pad_id, self.packed = batch_size, pad_id, packed
        self.n_rows = len(bounds) - 1

    def __len__(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        i %= len(self)
        first, last = i * self.batch_size, min((i + 1) * self.batch_size, self.n_rows)
        rows = [self.order[self.bounds[r] : self.bounds[r + 1]] for r in range(first, last)]
        return _collate(self.examples, rows, self.pad_id, self.packed)


def make_batches(
    examples,
    batch_size: int,
    epoch: int,
    seed: int,
    pad_id: int,
    packing: bool = False,
    seq_len: int | None = None,
) -> EpochBatches:
    """All batches of one epoch (a list of `Example` or an `Examples`), in order, built lazily.

    Padding mode: `batch_size` examples per batch, padded to the longest. Packing mode: examples are
    packed (in shuffled order) into rows of at most `seq_len` tokens, `batch_size` rows per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = as_examples(examples)
    order = np.array(epoch_order(len(examples), epoch, seed), dtype=np.int64)
    bounds = _row_bounds(examples, order, packing, seq_len)
    return EpochBatches(examples, order, bounds, batch_size, pad_id, packing)


def plan_padding_free_rows(lengths, max_examples: int, max_tokens: int) -> list[list[int]]:
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
    examples,
    batch_size: int,
    batch_tokens: int,
    epoch: int,
    seed: int,
    pad_id: int,
    rows_per_batch: int = 1,
) -> EpochBatches:
    """All micro-batches of one epoch (a list of `Example` or an `Examples`), padding-free and built
    lazily: each row holds up to `batch_size` examples and `batch_tokens` tokens back to back, in epoch
    order, with restarting position ids (packed layout).

    `rows_per_batch` rows make one micro-batch: 1 on a single process; the number of ranks in data
    parallel training, so that each rank's shard is one row (rows of a micro-batch are padded to the
    longest of them; on one process there is no padding at all). The last micro-batch may have fewer rows.
    """
    examples = as_examples(examples)
    order = np.array(epoch_order(len(examples), epoch, seed), dtype=np.int64)
    plan = plan_padding_free_rows(examples.lengths[order].tolist(), batch_size, batch_tokens)
    bounds = np.array([0] + [row[-1] + 1 for row in plan], dtype=np.int64)
    return EpochBatches(examples, order, bounds, rows_per_batch, pad_id, packed=True)
