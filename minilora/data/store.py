"""The token store: every example's ids and trained-token mask as flat arrays on disk, memory-mapped.

    ids.bin      all examples' token ids back to back, in the smallest unsigned dtype for the vocabulary
    trained.bin  one bit per token (numpy's packbits order): 1 where the loss is taken
    offsets.bin  int64 (N + 1,): example i is ids[offsets[i]:offsets[i + 1]]
    lines.bin    int64 (N,): the example's line in the source file
    targets.bin  int64 (N,): the example's target tokens (its mask without the first token)
    meta.json    sizes and SHA-256 of the files, dtype, counts and skipped lines; written last

So RAM per token is what the pages being read cost (about 2 bytes for a vocabulary under 65,536), and
processes that map the same folder share one copy in the page cache.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from minilora.atomic import writing
from minilora.data.examples import IGNORE_INDEX, Examples

ARRAYS = ("ids", "trained", "offsets", "lines", "targets")


def ids_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class StoreWriter:
    """Appends examples to a store folder; `finish(meta)` writes meta.json and returns the full meta."""

    def __init__(self, folder: Path, vocab_size: int):
        self.folder, self.dtype = Path(folder), ids_dtype(vocab_size)
        self.files = {name: open(self.folder / f"{name}.bin", "wb") for name in ARRAYS}
        self.digests = {name: hashlib.sha256() for name in ARRAYS}
        self.n_tokens = self.n_examples = 0
        self._bits = np.zeros(0, dtype=bool)  # mask bits not yet a whole byte
        self._write("offsets", np.zeros(1, dtype=np.int64))

    def _write(self, name: str, array: np.ndarray) -> None:
        data = array.tobytes()
        with writing(self.folder / f"{name}.bin", self.folder):  # a full disk names the file and the space
            self.files[name].write(data)
        self.digests[name].update(data)

    def append(self, ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray, lines: np.ndarray,
               targets: np.ndarray) -> None:
        """A chunk of examples: flat ids and trained (sum(lengths),), and (n,) lengths, lines, targets."""
        self._write("ids", ids.astype(self.dtype, copy=False))
        bits = np.concatenate([self._bits, trained])
        whole = len(bits) - len(bits) % 8
        self._write("trained", np.packbits(bits[:whole]))
        self._bits = bits[whole:]
        self._write("offsets", self.n_tokens + np.cumsum(lengths, dtype=np.int64))
        self._write("lines", lines.astype(np.int64))
        self._write("targets", targets.astype(np.int64))
        self.n_tokens += int(lengths.sum())
        self.n_examples += len(lengths)

    def finish(self, meta: dict) -> dict:
        self._write("trained", np.packbits(self._bits))
        with writing(self.folder, self.folder):
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
        meta = {**meta, "ids_dtype": self.dtype.name, "n_examples": self.n_examples, "n_tokens": self.n_tokens,
                "sizes": {name: (self.folder / f"{name}.bin").stat().st_size for name in ARRAYS},
                "sha256": {name: digest.hexdigest() for name, digest in self.digests.items()}}
        with writing(self.folder / "meta.json", self.folder):
            (self.folder / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return meta

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def expected_sizes(meta: dict) -> dict:
    n, t = meta["n_examples"], meta["n_tokens"]
    return {"ids": t * np.dtype(meta["ids_dtype"]).itemsize, "trained": -(-t // 8), "offsets": 8 * (n + 1),
            "lines": 8 * n, "targets": 8 * n}


class TokenStore(Examples):
    """`Examples` read from a store folder through memory maps (nothing is copied into RAM up front)."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta
        n = meta["n_examples"]
        self.ids = np.memmap(self.folder / "ids.bin", dtype=meta["ids_dtype"], mode="r", shape=(meta["n_tokens"],))
        self.trained = np.memmap(self.folder / "trained.bin", dtype=np.uint8, mode="r")
        self.offsets = np.memmap(self.folder / "offsets.bin", dtype=np.int64, mode="r", shape=(n + 1,))
        self.lines = np.memmap(self.folder / "lines.bin", dtype=np.int64, mode="r", shape=(n,))
        self.targets = np.memmap(self.folder / "targets.bin", dtype=np.int64, mode="r", shape=(n,))
        self.lengths = np.diff(self.offsets)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[start:end].astype(np.int64)
        bits = np.unpackbits(self.trained[start // 8 : -(-end // 8)])[start % 8 : start % 8 + end - start]
        return ids, np.where(bits.astype(bool), ids, IGNORE_INDEX)
