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
        self.byte_lengths = np.array([-1 if b is None else len(b) for b in token_bytes], dtype=np.int64)
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

    def locate(self, texts: list[str], ids: np.ndarray, tokens_per_text: np.ndarray) -> np.ndarray | None:
        """Where each token's run ends in the batch's bytes (the texts' UTF-8, back to back), (N,) int64,
        from the batch's ids (N,) and each text's token count (n,); None unless the tokens' bytes are
        exactly the texts' bytes, text by text."""
        ids, tokens_per_text = np.asarray(ids, dtype=np.int64), np.asarray(tokens_per_text, dtype=np.int64)
        if ids.size and (ids.max() >= len(self.byte_lengths) or ids.min() < 0):
            return None
        token_lengths = self.byte_lengths[ids]  # (N,) bytes per token
        encoded = [text.encode("utf-8") for text in texts]
        text_ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)  # (n,)
        n_bytes = int(text_ends[-1]) if len(texts) else 0
        if (token_lengths < 0).any() or int(token_lengths.sum()) != n_bytes:
            return None
        ends = np.cumsum(token_lengths)
        # Each text's tokens must end where its bytes end: no run crosses from one text into the next.
        ends_after_text = np.concatenate((np.zeros(1, np.int64), ends))[np.cumsum(tokens_per_text)]  # (n,)
        if not np.array_equal(ends_after_text, text_ends):
            return None
        # Gather every token's bytes in order: byte k of the batch is table[starts[token] + k - run start].
        shift = np.repeat(self.starts[ids] - (ends - token_lengths), token_lengths)
        if not np.array_equal(self.table[np.arange(n_bytes) + shift], np.frombuffer(b"".join(encoded), np.uint8)):
            return None
        return ends


def byte_offset(text: str, char: int) -> int:
    """Where character `char` of `text` starts in its UTF-8 bytes."""
    return char if text.isascii() else len(text[:char].encode("utf-8"))


def tokens_at(run_ends: np.ndarray, byte_positions: np.ndarray) -> np.ndarray:
    """The index of the token whose run holds each byte position (len(run_ends) past the last run)."""
    return np.searchsorted(run_ends, byte_positions, side="right")
