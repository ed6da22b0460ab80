"""The data vocabulary every other data module speaks: the ignore label, an example, a sequence of them.

An example is a token sequence with a label per token: the token itself where the loss is taken,
`IGNORE_INDEX` elsewhere (prompts, system and user turns). Labels are aligned with the ids, not
shifted: the loss predicts labels[t + 1] from position t, so labels[0] is never a target.

`Examples` is what batching and splitting read: lengths, source lines and per-example arrays, from
either a list of `Example` objects (tests, the Python API) or the memory-mapped token store.
"""

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The label value torch's cross_entropy skips by default.
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


def count_targets(labels) -> int:
    """Tokens the shifted loss counts in `labels` (..., T) (a tensor, array or list): labels[..., 1:] set."""
    labels = np.asarray(labels) if isinstance(labels, list) else labels
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids, IGNORE_INDEX where no loss
    line: int  # 1-based line in the source file

    @property
    def n_targets(self) -> int:
        return count_targets(self.labels)


class Examples(Sequence, ABC):
    """A sequence of examples: `ex[i]` is an `Example`, `ex[a:b]` and `ex.subset(idx)` are views."""

    lengths: np.ndarray  # (N,) int64 tokens per example
    lines: np.ndarray  # (N,) int64 source line per example
    targets: np.ndarray  # (N,) int64 target tokens per example (count_targets of its labels)

    @abstractmethod
    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of example i, each (T_i,) int64."""

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        i = range(len(self))[i]  # IndexError past the end (which also ends iteration)
        ids, labels = self.arrays(i)
        return Example(ids.tolist(), labels.tolist(), int(self.lines[i]))

    def subset(self, index) -> "Examples":
        return Subset(self, np.asarray(index, dtype=np.int64))

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def n_targets(self) -> int:
        return int(self.targets.sum())


class ExampleList(Examples):
    """`Examples` over Python `Example` objects, as they are."""

    def __init__(self, examples: list[Example]):
        self.examples = list(examples)
        self.lengths = np.array([len(e.input_ids) for e in self.examples], dtype=np.int64)
        self.lines = np.array([e.line for e in self.examples], dtype=np.int64)
        self.targets = np.array([e.n_targets for e in self.examples], dtype=np.int64)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        e = self.examples[i]
        return np.asarray(e.input_ids, dtype=np.int64), np.asarray(e.labels, dtype=np.int64)


class Subset(Examples):
    """The examples `index` (in that order) of another `Examples`; shares its storage."""

    def __init__(self, base: Examples, index: np.ndarray):
        if isinstance(base, Subset):  # a view of a view reads the storage directly
            base, index = base.base, base.index[index]
        self.base, self.index = base, index
        self.lengths, self.lines, self.targets = base.lengths[index], base.lines[index], base.targets[index]

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.base.arrays(int(self.index[i]))


def as_examples(examples) -> Examples:
    return examples if isinstance(examples, Examples) else ExampleList(examples)
