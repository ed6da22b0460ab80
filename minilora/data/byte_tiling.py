"""Where tokens start and end without asking the tokenizer for offsets, for byte-level BPE tokenizers.

Finding an assistant turn's tokens needs the token that holds a given character. The Rust tokenizer
answers that from character offsets, which cost about 40% of its time (it maps every byte of every
text to its character); without them (`encode_batch_fast`) the ids are the same and come sooner.

A byte-level BPE tokenizer (GPT-2's scheme, and Llama 3's, Qwen's, the built-in one's) tiles the text:
each token stands for a run of the text's bytes, written in a printable alphabet of 256 characters,
and its tokens' runs, one after the other, are the text's bytes. Each token's offsets are then the
characters its run touches, so the first token whose offsets hold character c (what
`Encoding.char_to_token` answers) is the token whose run holds c's first byte.

`ByteTiling.of(backend)` is None unless the tokenizer's definition makes its offsets exactly those runs:
no normalizer, a ByteLevel pre-tokenizer that adds no prefix space, a BPE model, and a post-processor
that leaves offsets alone. Every batch is still checked: its tokens' bytes must be the texts' bytes,
or `locate` returns None and the caller asks for the offsets.
"""

import json

import numpy as np


def byte_of_char() -> dict[str, int]:
    """The ByteLevel pre-tokenizer's alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the
    other 68 bytes, in order, for the characters from U+0100 on."""
    kept = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(0x100 + k): b for k, b in enumerate(moved)}}


def _keeps_offsets(processor: dict | None) -> bool:
    """Whether a post-processor leaves offsets alone when asked for no special tokens (a template adds
    nothing then; ByteLevel's trims spaces out of them unless told not to; RoBERTa's may trim)."""
    if processor is None or processor["type"] == "TemplateProcessing":
        return True
    if processor["type"] == "ByteLevel":
        return not processor.get("trim_offsets", True)
    if processor["type"] == "Sequence":
        return all(_keeps_offsets(p) for p in processor["processors"])
    return False


class ByteTiling:
    """Each token id's bytes, to place a batch's tokens on its texts' bytes."""

    def __init__(self, token_bytes: list[bytes | None]):
        # A token whose bytes are unknown (None) gets length -1, which no check passes.
        self.lengths = np.array([-1 if b is None else len(b) for b in token_bytes], dtype=np.int64)
        known = [b or b"" for b in token_bytes]
        self.table = np.frombuffer(b"".join(known) or b"\0", dtype=np.uint8)  # every token's bytes, back to back
        self.starts = np.concatenate([[0], np.cumsum([len(b) for b in known])[:-1]]).astype(np.int64)

    @classmethod
    def of(cls, backend) -> "ByteTiling | None":
        """The tiling of a `tokenizers.Tokenizer`, or None when its offsets need not be byte runs."""
        definition = json.loads(backend.to_str())
        pre = definition.get("pre_tokenizer") or {}
        if (definition.get("normalizer") is not None or pre.get("type") != "ByteLevel"
                or pre.get("add_prefix_space", False) or definition["model"].get("type") != "BPE"
                or not _keeps_offsets(definition.get("post_processor"))):
            return None
        to_byte = byte_of_char()
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        vocab = backend.get_vocab(with_added_tokens=True)
        token_bytes: list[bytes | None] = [None] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if token in added:  # matched in the raw text, so it stands for its own UTF-8 bytes
                token_bytes[i] = token.encode("utf-8")
            elif all(char in to_byte for char in token):
                token_bytes[i] = bytes(to_byte[char] for char in token)
        return cls(token_bytes)

    def locate(self, texts: list[str], ids: list[np.ndarray]) -> list[np.ndarray] | None:
        """Per text, the end of each token's run in the text's bytes, (T,) int64, from its ids (T,); None
        unless the tokens' bytes are exactly the texts' bytes."""
        flat = np.concatenate([np.asarray(row, dtype=np.int64) for row in ids]) if ids else np.zeros(0, np.int64)
        if flat.size and (flat.max() >= len(self.lengths) or flat.min() < 0):
            return None
        lengths = self.lengths[flat]
        encoded = [text.encode("utf-8") for text in texts]
        if (lengths < 0).any() or int(lengths.sum()) != sum(len(b) for b in encoded):
            return None
        ends = np.cumsum(lengths)
        # Gather every token's bytes in order: byte k of the batch comes from table[starts[token] + k - run start].
        shift = np.repeat(self.starts[flat] - (ends - lengths), lengths)
        if not np.array_equal(self.table[np.arange(len(shift)) + shift], np.frombuffer(b"".join(encoded), np.uint8)):
            return None
        out, token, byte = [], 0, 0
        for row, text_bytes in zip(ids, encoded, strict=True):
            row_ends = ends[token : token + len(row)] - byte
            if (row_ends[-1] if len(row_ends) else 0) != len(text_bytes):
                return None  # a run crosses from one text into the next
            out.append(row_ends)
            token, byte = token + len(row), byte + len(text_bytes)
        return out


def token_at(text: str, run_ends: np.ndarray, char: int) -> int:
    """Index of the token whose run holds character `char`'s first byte (len(run_ends) at the end)."""
    byte = char if text.isascii() else len(text[:char].encode("utf-8"))
    return int(np.searchsorted(run_ends, byte, side="right"))
