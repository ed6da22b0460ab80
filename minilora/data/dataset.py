"""A training data file, ready: validated, tokenized, held in a memory-mapped token store, cached.

`load_dataset` is the one entry point: it finds the file's store in the cache (checked), or prepares
it (prepare.py) into a temporary folder and publishes it (cache.py). Without a cache folder the store
is prepared into a temporary folder that is removed once mapped (the mapping keeps the data).
"""

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minilora.atomic import writing
from minilora.data import cache
from minilora.data.examples import Examples, seeded_permutation
from minilora.data.prepare import prepare
from minilora.data.records import check_file
from minilora.data.store import TokenStore
from minilora.errors import UserError


@dataclass
class Dataset:
    path: str
    fmt: str
    examples: Examples
    n_lines: int  # non-blank lines in the file (kept + skipped + dropped)
    n_truncated: int  # kept examples cut to seq_len
    n_dropped: int  # examples with no target token left after truncation
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) with skip_bad_lines
    sha256: str = ""  # of the file's bytes, recorded with checkpoints to detect a changed file on resume
    n_tokens: int = 0
    n_target_tokens: int = 0
    store: str = ""  # the cache folder holding the tokens ("" when prepared without a cache)
    cached: bool = False  # found ready in the cache (not prepared by this call)
    seconds: float = 0.0  # to prepare or to load and check


def load_dataset(path, tokenizer, seq_len: int, skip_bad_lines: bool = False, cache_dir=None,
                 workers: int | None = None, progress: bool = False) -> Dataset:
    """Read, validate and tokenize a JSONL file into examples of at most `seq_len` tokens.

    With `cache_dir`, a store prepared before for the same file content, tokenizer, `seq_len` and
    options is reused, and a new one is kept there. `workers`: processes (default: one per core for
    files of a few MB and more, none for small ones).
    """
    path = Path(path)
    started = time.perf_counter()
    check_file(path)
    sha = cache.file_sha256(path)
    if cache_dir is None:
        build = Path(tempfile.mkdtemp(prefix="minilora-data-"))
        try:
            meta = prepare(path, tokenizer, seq_len, skip_bad_lines, build, workers, progress)
            store = TokenStore(build, meta)  # mapped: the files stay readable after their folder goes
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return _dataset(path, sha, store, "", False, started)
    root = Path(cache_dir)
    identity = cache.store_identity(sha, tokenizer, seq_len, skip_bad_lines)
    key = cache.cache_key(identity)
    target = root / key
    meta = cache.read_verified(target, identity)
    if meta is not None:
        return _dataset(path, sha, TokenStore(target, meta), str(target), True, started)
    stat = path.stat()
    build = cache.new_build_folder(root, key)
    try:
        prepare(path, tokenizer, seq_len, skip_bad_lines, build, workers, progress)
        if path.stat().st_mtime_ns != stat.st_mtime_ns or path.stat().st_size != stat.st_size:
            raise UserError(f"{path}: the file changed while it was being prepared; run again")
        meta = _stamp(build, identity)
        cache.publish(build, target, identity)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _dataset(path, sha, TokenStore(target, meta), str(target), False, started)


def _stamp(build: Path, identity: dict) -> dict:
    """Record in the store's meta what it was made from (checked before every later use)."""
    meta = json.loads((build / "meta.json").read_text(encoding="utf-8"))
    meta.update(identity=identity)
    with writing(build / "meta.json", build):
        (build / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def _dataset(path: Path, sha: str, store: TokenStore, folder: str, cached: bool, started: float) -> Dataset:
    m = store.meta
    return Dataset(path=str(path), fmt=m["fmt"], examples=store, n_lines=m["n_lines"], n_truncated=m["n_truncated"],
                   n_dropped=m["n_dropped"], skipped=[(line, why) for line, why in m["skipped"]], sha256=sha,
                   n_tokens=store.n_tokens, n_target_tokens=store.n_targets, store=folder, cached=cached,
                   seconds=time.perf_counter() - started)


def eval_size(n: int, eval_fraction: float, max_examples: int = 0) -> int:
    """Held-out examples out of `n`: the fraction (at least one, and train keeps one), capped at
    `max_examples` (0: no cap)."""
    if not 0 <= eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n_eval = 0 if eval_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    return min(n_eval, max_examples) if max_examples else n_eval


def _take(items, index: np.ndarray):
    return items.subset(index) if isinstance(items, Examples) else [items[i] for i in index.tolist()]


def split_eval(examples, eval_fraction: float, seed: int, max_examples: int = 0) -> tuple:
    """(train, eval), a seeded split that keeps file order inside each part (of a list or `Examples`).

    With a fraction > 0 and at least 2 examples, eval gets at least one example and train keeps one;
    eval has at most `max_examples` (0: no cap), the rest train.
    """
    n = len(examples)
    n_eval = eval_size(n, eval_fraction, max_examples)
    held = np.zeros(n, dtype=bool)
    held[seeded_permutation(n, f"split:{seed}")[:n_eval]] = True
    return _take(examples, np.flatnonzero(~held)), _take(examples, np.flatnonzero(held))


def sample_eval(examples, seed: int, max_examples: int):
    """At most `max_examples` of a held-out file's examples (a seeded choice, file order kept); 0: all."""
    n = len(examples)
    if not max_examples or n <= max_examples:
        return examples
    chosen = np.sort(np.array(seeded_permutation(n, f"eval:{seed}")[:max_examples], dtype=np.int64))
    return _take(examples, chosen)
