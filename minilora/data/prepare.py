"""Stream a JSONL file through validation and tokenization into a token store, over worker processes.

The main process reads the file in chunks of lines and hands them to workers (forked, so they share
the tokenizer without pickling it); each worker parses, validates and tokenizes its chunk and sends
back flat arrays, which the main process appends to the store in file order. At most a few chunks
are in flight, so memory stays bounded whatever the file's size. A bad line stops the run with the
first bad line's `file:line` (as a sequential read would report it), and the caller removes the
half-written folder. A thread validates every line meanwhile, far ahead of the tokenization (parsing
a line costs a few microseconds, tokenizing it a hundred or more), so a bad line deep in a big file
stops the run about a second after the start instead of when the workers reach it.
"""

import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from jinja2 import TemplateError
from tqdm.auto import tqdm

from minilora.data.records import (
    BadLine,
    check_file,
    check_record,
    first_bad_line,
    first_record,
    iter_lines,
    no_valid_line,
)
from minilora.data.store import StoreWriter
from minilora.data.tokenize import Encoder, has_chat_template
from minilora.errors import DataError

# Lines per chunk. A worker's heap grows to what one chunk's encodings need (the Rust encodings hold
# tens of bytes per token) plus what the allocator keeps: on the data benchmark's alpaca file, 512 lines
# held about 90 MB per worker, 128 about 60 MB, for 2% more CPU time in hand-offs (64: 7% more).
CHUNK_LINES = 128
# ... and at most this much text (past one line): tokenizing holds about 135 bytes per token (measured on an
# 8 MiB line with the built-in byte-level tokenizer: 1.08 GB), so 128 long documents in one chunk would take
# a worker past any machine's memory; this keeps a worker near one line's worth (MAX_LINE_BYTES, ~1.1 GB).
# An alpaca or chat file's 128 lines are well under it, so the chunks of such files stay as they were.
CHUNK_BYTES = 1 << 20
# Below this size a file is prepared in the calling process: starting workers costs more than it saves.
PARALLEL_MIN_BYTES = 4 << 20


@dataclass
class Job:
    """What every chunk needs: the file's format (decided on line `first`) and how to tokenize."""

    fmt: str
    first: int
    seq_len: int
    skip_bad_lines: bool
    encoder: Encoder | None  # None: validate only (chat data without a chat template)
    ids_dtype: np.dtype  # the store's: a chunk's ids travel back from its worker in it


@dataclass
class Chunk:
    n_valid: int = 0
    skipped: list = field(default_factory=list)  # (line, reason)
    error: tuple[int, str] | None = None  # the first bad line when not skipping
    ids: np.ndarray | None = None  # (sum(lengths),) flat
    trained: np.ndarray | None = None  # (sum(lengths),) bool
    lengths: np.ndarray | None = None  # (n,)
    lines: np.ndarray | None = None  # (n,)
    targets: np.ndarray | None = None  # (n,)
    n_truncated: int = 0
    n_dropped: int = 0


# What a chat template raises when it refuses a conversation (`raise_exception`), cannot be compiled (an
# unknown filter) or fails on a value: the user's data or the model's template, never a bug of ours.
TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError, KeyError, IndexError)


def _without_refused(job: Job, records: list, record_lines: list, chunk: Chunk) -> tuple[list, list]:
    """The records the chat template renders, each tried alone; the first refused one becomes the chunk's
    error (or, with skip_bad_lines, each is a skipped line)."""
    kept, kept_lines = [], []
    for record, lineno in zip(records, record_lines, strict=True):
        try:
            job.encoder.encode([record])
        except TEMPLATE_ERRORS as err:
            why = f"the tokenizer's chat template fails on this example ({type(err).__name__}: {str(err)[:200]})"
            if not job.skip_bad_lines:
                chunk.error = (lineno, why)
                return [], []
            chunk.skipped.append((lineno, why))
            chunk.n_valid -= 1
            continue
        kept.append(record)
        kept_lines.append(lineno)
    chunk.skipped.sort()
    return kept, kept_lines


def process_chunk(job: Job, lines: list[tuple[int, bytes]]) -> Chunk:
    chunk, records, record_lines = Chunk(), [], []
    for lineno, line in lines:
        try:
            records.append(check_record(line, lineno, job.fmt, job.first))
            record_lines.append(lineno)
        except BadLine as bad:
            if not job.skip_bad_lines:
                chunk.error = (lineno, str(bad))
                return chunk
            chunk.skipped.append((lineno, str(bad)))
    chunk.n_valid = len(records)
    if job.encoder is None or not records:
        return chunk
    try:
        encoded = job.encoder.encode(records)
    except TEMPLATE_ERRORS:
        if not job.encoder.chat:
            raise
        records, record_lines = _without_refused(job, records, record_lines, chunk)
        if chunk.error is not None or not records:
            return chunk
        encoded = job.encoder.encode(records)
    lengths = encoded.lengths  # (n,) untruncated
    starts = np.cumsum(lengths) - lengths
    kept = np.minimum(lengths, job.seq_len)  # (n,) tokens left after truncation
    # Target tokens of each truncated example: its trained tokens but the first (never predicted).
    seen = np.concatenate([[0], np.cumsum(encoded.trained)])  # (N+1,) trained tokens before each position
    targets = seen[starts + kept] - seen[np.minimum(starts + 1, starts + kept)]
    keep = targets > 0
    chunk.n_dropped = int((~keep).sum())
    chunk.n_truncated = int((keep & (lengths > job.seq_len)).sum())
    # Every token of a kept example within its first `kept` positions.
    position = np.arange(len(encoded.ids)) - np.repeat(starts, lengths)
    take = position < np.repeat(np.where(keep, kept, 0), lengths)
    chunk.ids = encoded.ids[take].astype(job.ids_dtype)
    chunk.trained = encoded.trained[take]
    chunk.lengths, chunk.lines = kept[keep], np.array(record_lines, dtype=np.int64)[keep]
    chunk.targets = targets[keep]
    return chunk


_WORKER_JOB: Job | None = None  # a worker process's job, set once when the pool starts it


def _start_worker(job: Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    # One tokenizer thread per worker: the workers already use every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_chunk(lines: list[tuple[int, bytes]]) -> Chunk:
    return process_chunk(_WORKER_JOB, lines)


def _chunks(path: Path, first: int, max_lines: int, max_bytes: int):
    """The file's lines from `first` on, in chunks of at most `max_lines` lines, closed once they hold
    `max_bytes` of text or more."""
    batch, size = [], 0
    for lineno, line in iter_lines(path):
        if lineno < first:
            continue
        batch.append((lineno, line))
        size += len(line)
        if len(batch) == max_lines or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_results(job: Job, path: Path, workers: int):
    """Chunks' results in file order, computed in `workers` processes (or here when workers <= 1)."""
    if workers <= 1:
        for lines in _chunks(path, job.first, CHUNK_LINES, CHUNK_BYTES):
            yield len(lines), process_chunk(job, lines)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_start_worker,
                             initargs=(job,)) as pool:
        pending = deque()
        try:
            for lines in _chunks(path, job.first, CHUNK_LINES, CHUNK_BYTES):
                pending.append((len(lines), pool.submit(_worker_chunk, lines)))
                if len(pending) >= 2 * workers:
                    n, future = pending.popleft()
                    yield n, future.result()
            while pending:
                n, future = pending.popleft()
                yield n, future.result()
        finally:
            for _, future in pending:
                future.cancel()


class LineCheck:
    """Validates every line of the file in a thread of its own while the chunks are tokenized.

    `raise_if_bad()` raises the first bad line's DataError once the thread has found one: the same line
    and message as the chunk that holds it would give, only sooner. So a line that cannot be read is
    reported ahead of an error that only tokenization reveals on an earlier line (a chat template's own
    `raise_exception`), which a sequential pass would have met first. With skip_bad_lines nothing is checked
    (the chunks collect the bad lines themselves)."""

    def __init__(self, path: Path, job: Job):
        self.path, self.found = path, None
        self._stop = threading.Event()
        self._thread = None
        if not job.skip_bad_lines:
            self._thread = threading.Thread(target=self._run, args=(job.fmt, job.first), daemon=True)
            self._thread.start()

    def _run(self, fmt: str, first: int) -> None:
        try:
            self.found = first_bad_line(self.path, fmt, first, self._stop)
        except OSError:
            pass  # the file became unreadable: the chunks' reading of it reports that

    def raise_if_bad(self) -> None:
        if self.found is not None:
            raise DataError(self.path, *self.found)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n + 1


def default_workers(path: Path) -> int:
    if path.stat().st_size < PARALLEL_MIN_BYTES:
        return 0
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _fill(job: Job, path: Path, writer: StoreWriter, skipped: list, workers: int | None, progress: bool) -> dict:
    counts = {"n_valid": 0, "n_truncated": 0, "n_dropped": 0}
    # Shown after a second only (a small file prints nothing) and cleared when done, so that an error
    # found on the way is still the one line the user reads.
    check = None
    with tqdm(total=count_lines(path), desc=f"data {path.name}", unit="ex", disable=not progress,
              dynamic_ncols=True, mininterval=0.5, delay=1.0, leave=False) as bar:
        bar.update(job.first - 1)
        results = _ordered_results(job, path, default_workers(path) if workers is None else workers)
        try:
            for n_lines, chunk in results:
                # Started once the first chunk is back, so the workers are forked before the thread exists
                # (a fork copies only the forking thread, and locks another one holds stay held).
                check = check or LineCheck(path, job)
                check.raise_if_bad()
                if chunk.error is not None:
                    raise DataError(path, *chunk.error)
                _add(chunk, writer, skipped, counts)
                bar.update(n_lines)
        finally:
            if check is not None:
                check.close()
            results.close()  # stops the workers now, not when the generator is collected
    return counts


def _add(chunk: Chunk, writer: StoreWriter, skipped: list, counts: dict) -> None:
    skipped += chunk.skipped
    for key in counts:
        counts[key] += getattr(chunk, key)
    if chunk.lengths is not None and len(chunk.lengths):
        writer.append(chunk.ids, chunk.trained, chunk.lengths, chunk.lines, chunk.targets)


def prepare(path: Path, tokenizer, seq_len: int, skip_bad_lines: bool, folder: Path, workers: int | None = None,
            progress: bool = False) -> dict:
    """Validate and tokenize `path` into a store in `folder`; returns the store's meta (see store.py)."""
    started = time.perf_counter()
    check_file(path)
    fmt, first, skipped = first_record(path, skip_bad_lines)
    encoder = Encoder(tokenizer, fmt) if fmt != "chat" or has_chat_template(tokenizer) else None
    # Ids may run past len(tokenizer) where a vocabulary has gaps: size the dtype by the largest id.
    writer = StoreWriter(folder, max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1))
    job = Job(fmt, first, seq_len, skip_bad_lines, encoder, writer.dtype)
    try:
        counts = _fill(job, path, writer, skipped, workers, progress)
    except BaseException:
        writer.close()
        raise
    if not counts["n_valid"]:
        writer.close()
        raise no_valid_line(path, skipped)
    if encoder is None:
        writer.close()
        raise DataError(path, None, "chat-format data needs a tokenizer with a chat template, and this one has none")
    if writer.n_examples == 0:
        writer.close()
        raise DataError(path, None, f"no example has a response token within --seq-len {seq_len} (the prompts are "
                                    "too long); raise --seq-len or shorten the prompts")
    meta = {"source": str(path), "fmt": fmt, "seq_len": seq_len, "n_lines": counts["n_valid"] + len(skipped),
            "n_truncated": counts["n_truncated"], "n_dropped": counts["n_dropped"], "skipped": skipped,
            "prepare_s": round(time.perf_counter() - started, 3)}
    return writer.finish(meta)
