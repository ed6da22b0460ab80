"""Token positions from the tokens' bytes (byte_tiling.py) against the tokenizer's own offsets."""

import json

import numpy as np
import pytest
from test_data_pins import TRICKY_CHATS
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from minilora.builtin import build_tokenizer
from minilora.data.byte_tiling import ByteTiling, byte_offset, tokens_at
from minilora.data.tokenize import TILING_MIN_TEXTS, Encoder

SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{{ '<s>' }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# Multi-byte characters that merges may split or join: accents, a combining mark, CJK, an emoji, a ZWJ sequence.
TEXTS = ["café au lait", "naïve e\u0301lan", "東京の天気は？", "ok 👍🏽 done", "👩‍👩‍👧 family", "  spaces  \n\ttabs",
         "<|end|> inside", "ascii only, plain words"]


def merged_byte_level(add_prefix_space: bool = False, trim: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE with merges learnt on the test texts, so that tokens hold several bytes and some
    hold parts of a character."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(TEXTS * 20 + [c for turns in TRICKY_CHATS for _, c in turns] * 20, trainer)
    if trim:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = TEMPLATE
    return fast


def chats() -> list[list[dict]]:
    base = [[{"role": r, "content": c} for r, c in turns] for turns in TRICKY_CHATS]
    more = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}] for a in TEXTS for b in TEXTS]
    return base + more


@pytest.mark.parametrize("kind", ["builtin", "merged"])
def test_spans_from_the_tokens_bytes_equal_those_from_the_offsets(kind):
    tok = build_tokenizer() if kind == "builtin" else merged_byte_level()
    conversations = chats()
    assert len(conversations) >= TILING_MIN_TEXTS
    tiled, offsets = Encoder(tok, "chat"), Encoder(tok, "chat")
    offsets.tiling = False  # as for a tokenizer that is not byte-level
    records = [{"messages": m} for m in conversations]
    by_bytes, by_offsets = tiled.encode(records).split(), offsets.encode(records).split()
    assert isinstance(tiled.tiling, ByteTiling)
    for (ids, trained), (ref_ids, ref_trained) in zip(by_bytes, by_offsets, strict=True):
        assert ids.tolist() == ref_ids.tolist() and trained.tolist() == ref_trained.tolist()
    assert sum(int(t.sum()) for _, t in by_bytes) > 0


def test_offsets_that_need_not_be_byte_runs_keep_the_offsets():
    assert ByteTiling.of(merged_byte_level().backend_tokenizer) is not None
    assert ByteTiling.of(merged_byte_level(add_prefix_space=True).backend_tokenizer) is None
    assert ByteTiling.of(merged_byte_level(trim=True).backend_tokenizer) is None  # spaces trimmed out of offsets
    plain = build_tokenizer()
    definition = json.loads(plain.backend_tokenizer.to_str())
    definition["normalizer"] = {"type": "Lowercase"}
    assert ByteTiling.of(Tokenizer.from_str(json.dumps(definition))) is None


def _flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([i for row in rows for i in row], dtype=np.int64), np.array([len(row) for row in rows]))


def test_tokens_that_do_not_spell_the_text_are_refused():
    backend = build_tokenizer().backend_tokenizer
    tiling = ByteTiling.of(backend)
    texts = ["héllo", "<|end|>x"]
    ids = [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
    ends = tiling.locate(texts, *_flat(ids))
    assert ends.tolist() == [1, 2, 3, 4, 5, 6, 13, 14]  # é's two bytes are two tokens; <|end|> is 7 bytes
    assert tiling.locate(texts[::-1], *_flat(ids)) is None  # the same bytes in all, split elsewhere
    assert tiling.locate(["hello", "<|end|>x"], *_flat(ids)) is None  # other bytes
    assert tiling.locate(texts, *_flat([ids[0], ids[1] + [0]])) is None  # <unk> stands for no bytes of the text
    assert tiling.locate(texts, *_flat([ids[0], [10**6]])) is None  # an id the vocabulary does not have
    assert tiling.locate(["héllo<|end|>", "x"], *_flat([ids[0] + ids[1][:1], ids[1][1:]])) is not None
    assert tiling.locate(["héllo<|end|>", "x"], *_flat([ids[0], ids[1]])) is None  # a run crosses into the next text
    assert tiling.locate([], [], []).tolist() == []
    assert np.array_equal(tiling.byte_lengths[ids[1]], [7, 1])


@pytest.mark.parametrize("kind", ["builtin", "merged"])
def test_the_token_of_each_character_is_the_one_char_to_token_gives(kind):
    backend = (build_tokenizer() if kind == "builtin" else merged_byte_level()).backend_tokenizer
    tiling = ByteTiling.of(backend)
    texts = [a + "<|end|>\n" + b for a in TEXTS for b in TEXTS[:3]]
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    ends = tiling.locate(texts, *_flat([enc.ids for enc in encodings]))
    token_start = byte_start = 0
    for text, enc in zip(texts, encodings, strict=True):
        # Positions over the whole batch, as the encoder asks for them.
        found = tokens_at(ends, [byte_start + byte_offset(text, c) for c in range(len(text))]) - token_start
        assert found.tolist() == [enc.char_to_token(c) for c in range(len(text))]
        token_start, byte_start = token_start + len(enc.ids), byte_start + len(text.encode("utf-8"))
        assert tokens_at(ends, [byte_start - 1])[0] == token_start - 1  # the text's last byte: its last token
