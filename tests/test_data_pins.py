"""Tokens, masks, counts and batches pinned to the values of the original (pre-cache) implementation.

The digests below were recorded from the first implementation (which re-rendered the chat template
for every turn and held examples as Python lists) on the repository's data; the streaming, cached
pipeline must reproduce them exactly, so batches, losses and adapters stay bit-identical.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from minilora.builtin import build_tokenizer
from minilora.data.batching import make_batches
from minilora.data.dataset import load_dataset

ROOT = Path(__file__).resolve().parent.parent
PAD = 259


def _tok(template: bool):
    tok = build_tokenizer()
    if not template:
        tok.chat_template = None
    return tok


def dataset_digest(ds) -> dict:
    h = hashlib.sha256()
    for e in ds.examples:
        h.update(json.dumps([e.line, list(e.input_ids), list(e.labels)]).encode())
    return {
        "fmt": ds.fmt,
        "n_examples": len(ds.examples),
        "n_lines": ds.n_lines,
        "n_truncated": ds.n_truncated,
        "n_dropped": ds.n_dropped,
        "n_tokens": ds.n_tokens,
        "n_target_tokens": ds.n_target_tokens,
        "skipped": [line for line, _ in ds.skipped],
        "examples": h.hexdigest()[:16],
    }


def batches_digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.labels, b.attention_mask, b.position_ids):
            h.update(b"none" if t is None else str(tuple(t.shape)).encode() + np.ascontiguousarray(t.numpy()).tobytes())
        h.update(json.dumps([b.n_target_tokens, b.n_tokens, b.lines]).encode())
    return h.hexdigest()[:16]


DATASET_CASES = [
    ("examples/demo.jsonl", True, 128),
    ("examples/demo.jsonl", True, 40),
    ("examples/demo.jsonl", False, 128),
    ("examples/demo.jsonl", False, 56),
    ("examples/samples/alpaca.jsonl", True, 256),
    ("examples/samples/alpaca.jsonl", True, 34),
    ("examples/samples/alpaca.jsonl", False, 256),
    ("examples/samples/chat.jsonl", True, 256),
    ("examples/samples/chat.jsonl", True, 60),
    ("examples/samples/prompt_completion.jsonl", True, 256),
    ("examples/samples/prompt_completion.jsonl", True, 20),
    ("examples/samples/text.jsonl", True, 256),
    ("examples/samples/text.jsonl", True, 10),
]

DATASET_PINS = {
    "examples/demo.jsonl|True|128": {
        "fmt": "alpaca",
        "n_examples": 512,
        "n_lines": 512,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 21598,
        "n_target_tokens": 3681,
        "skipped": [],
        "examples": "a99382a8549ca62d",
    },
    "examples/demo.jsonl|True|40": {
        "fmt": "alpaca",
        "n_examples": 359,
        "n_lines": 512,
        "n_truncated": 29,
        "n_dropped": 153,
        "n_tokens": 13382,
        "n_target_tokens": 2360,
        "skipped": [],
        "examples": "b5f93a47acd31907",
    },
    "examples/demo.jsonl|False|128": {
        "fmt": "alpaca",
        "n_examples": 512,
        "n_lines": 512,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 39183,
        "n_target_tokens": 2657,
        "skipped": [],
        "examples": "1b845c763b58087f",
    },
    "examples/demo.jsonl|False|56": {
        "fmt": "alpaca",
        "n_examples": 77,
        "n_lines": 512,
        "n_truncated": 77,
        "n_dropped": 435,
        "n_tokens": 4312,
        "n_target_tokens": 285,
        "skipped": [],
        "examples": "8737518a29274121",
    },
    "examples/samples/alpaca.jsonl|True|256": {
        "fmt": "alpaca",
        "n_examples": 3,
        "n_lines": 3,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 119,
        "n_target_tokens": 22,
        "skipped": [],
        "examples": "f5af3f65aa965e84",
    },
    "examples/samples/alpaca.jsonl|True|34": {
        "fmt": "alpaca",
        "n_examples": 2,
        "n_lines": 3,
        "n_truncated": 2,
        "n_dropped": 1,
        "n_tokens": 68,
        "n_target_tokens": 9,
        "skipped": [],
        "examples": "4a6cd9dcf4c3410d",
    },
    "examples/samples/alpaca.jsonl|False|256": {
        "fmt": "alpaca",
        "n_examples": 3,
        "n_lines": 3,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 216,
        "n_target_tokens": 16,
        "skipped": [],
        "examples": "a0f851f8e0a107b9",
    },
    "examples/samples/chat.jsonl|True|256": {
        "fmt": "chat",
        "n_examples": 2,
        "n_lines": 2,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 102,
        "n_target_tokens": 19,
        "skipped": [],
        "examples": "da55150385577a75",
    },
    "examples/samples/chat.jsonl|True|60": {
        "fmt": "chat",
        "n_examples": 2,
        "n_lines": 2,
        "n_truncated": 1,
        "n_dropped": 0,
        "n_tokens": 85,
        "n_target_tokens": 11,
        "skipped": [],
        "examples": "02fa280c28a3a0c6",
    },
    "examples/samples/prompt_completion.jsonl|True|256": {
        "fmt": "prompt_completion",
        "n_examples": 2,
        "n_lines": 2,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 47,
        "n_target_tokens": 10,
        "skipped": [],
        "examples": "0e31ee49d7eddf55",
    },
    "examples/samples/prompt_completion.jsonl|True|20": {
        "fmt": "prompt_completion",
        "n_examples": 1,
        "n_lines": 2,
        "n_truncated": 0,
        "n_dropped": 1,
        "n_tokens": 17,
        "n_target_tokens": 4,
        "skipped": [],
        "examples": "96d927e862c1228e",
    },
    "examples/samples/text.jsonl|True|256": {
        "fmt": "text",
        "n_examples": 2,
        "n_lines": 2,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 137,
        "n_target_tokens": 135,
        "skipped": [],
        "examples": "7195c12abbdddfc3",
    },
    "examples/samples/text.jsonl|True|10": {
        "fmt": "text",
        "n_examples": 2,
        "n_lines": 2,
        "n_truncated": 2,
        "n_dropped": 0,
        "n_tokens": 20,
        "n_target_tokens": 18,
        "skipped": [],
        "examples": "a0f57d22138ab9de",
    },
}

BATCH_CASES = [  # (file, template, seq_len, batch_size, epoch, seed, packing)
    ("examples/demo.jsonl", True, 128, 8, 0, 42, False),
    ("examples/demo.jsonl", True, 128, 8, 1, 42, False),
    ("examples/demo.jsonl", True, 128, 4, 0, 42, True),
    ("examples/demo.jsonl", True, 128, 4, 2, 7, True),
    ("examples/demo.jsonl", False, 64, 3, 0, 1, True),
    ("examples/samples/chat.jsonl", True, 256, 2, 0, 42, True),
]

BATCH_PINS = {
    "examples/demo.jsonl|True|128|8|0|42|False": "2de30d473e2055b3",
    "examples/demo.jsonl|True|128|8|1|42|False": "2b458dbdd871b29b",
    "examples/demo.jsonl|True|128|4|0|42|True": "e5f98074d313ef51",
    "examples/demo.jsonl|True|128|4|2|7|True": "379d0135607f9e40",
    "examples/demo.jsonl|False|64|3|0|1|True": "2f72c2311b482335",
    "examples/samples/chat.jsonl|True|256|2|0|42|True": "30e971d5792c7888",
}

# Conversations that probe the chat spans: system turns, several and trailing turns, empty replies,
# non-ASCII text, text that looks like the template's markers, private-use characters.
TRICKY_CHATS = [
    [("user", "q"), ("assistant", "a")],
    [("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")],
    [("user", "q"), ("assistant", "a"), ("user", "more?")],
    [("user", "héllo wörld ✓"), ("assistant", "日本語 🎉")],
    [("user", "x"), ("assistant", ""), ("user", "y"), ("assistant", "z")],
    [("user", "say <|end|> and </s>"), ("assistant", "<|user|>\nok<|end|>")],
    [("user", "  padded  "), ("assistant", "\n\nlines\n\n")],
    [("user", "\ue000" + "0\ue001"), ("assistant", "\ue0001\ue001 \uf8ff")],
    [("system", "only system first"), ("assistant", "a"), ("assistant", "b")],
]


TRICKY_PINS = {
    256: {
        "fmt": "chat",
        "n_examples": 27,
        "n_lines": 27,
        "n_truncated": 0,
        "n_dropped": 0,
        "n_tokens": 726,
        "n_target_tokens": 240,
        "skipped": [],
        "examples": "6c44208e832536df",
    },
    12: {
        "fmt": "chat",
        "n_examples": 9,
        "n_lines": 27,
        "n_truncated": 6,
        "n_dropped": 18,
        "n_tokens": 108,
        "n_target_tokens": 27,
        "skipped": [],
        "examples": "d4997ae76d68db55",
    },
}


def write_tricky_chats(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for turns in TRICKY_CHATS * 3:
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    return path


def _key(case) -> str:
    return "|".join(str(x) for x in case)


@pytest.mark.parametrize("case", DATASET_CASES, ids=_key)
def test_dataset_matches_the_original_implementation(case):
    path, template, seq_len = case
    assert dataset_digest(load_dataset(ROOT / path, _tok(template), seq_len)) == DATASET_PINS[_key(case)]


@pytest.mark.parametrize("seq_len", [256, 12])
def test_tricky_chats_match_the_original_implementation(tmp_path, seq_len):
    ds = load_dataset(write_tricky_chats(tmp_path / "chats.jsonl"), _tok(True), seq_len)
    assert dataset_digest(ds) == TRICKY_PINS[seq_len]


@pytest.mark.parametrize("case", BATCH_CASES, ids=_key)
def test_batches_match_the_original_implementation(case):
    path, template, seq_len, batch_size, epoch, seed, packing = case
    ds = load_dataset(ROOT / path, _tok(template), seq_len)
    batches = make_batches(ds.examples, batch_size, epoch, seed, PAD, packing=packing, seq_len=seq_len)
    assert batches_digest(batches) == BATCH_PINS[_key(case)]
