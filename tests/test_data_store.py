"""The prepared-data store and cache: reuse, keys, damage and failure handling, worker processes,
one-rendering chat spans against the per-turn definition, capped evaluation, sharded token counts."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_pins import TRICKY_CHATS, dataset_digest

from minilora.builtin import build_tokenizer
from minilora.data import prepare as prepare_module
from minilora.data.batching import make_batches
from minilora.data.dataset import load_dataset, sample_eval, split_eval
from minilora.data.tokenize import Encoder
from minilora.errors import DataError
from minilora.training.distributed import DistInfo, shard

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.jsonl"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_second_load_comes_from_the_cache_with_the_same_examples(tmp_path, tok):
    first = load_dataset(DEMO, tok, 128, cache_dir=tmp_path)
    second = load_dataset(DEMO, tok, 128, cache_dir=tmp_path)
    assert (first.cached, second.cached) == (False, True)
    assert first.store == second.store and Path(second.store).parent == tmp_path
    assert dataset_digest(first) == dataset_digest(second) == dataset_digest(load_dataset(DEMO, tok, 128))
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.store).name]  # no temporary folder left
    other = load_dataset(DEMO, tok, 64, cache_dir=tmp_path)  # another --seq-len: another store
    assert not other.cached and other.store != first.store
    plain = build_tokenizer()
    plain.chat_template = None  # another template: another store
    assert load_dataset(DEMO, plain, 128, cache_dir=tmp_path).store not in (first.store, other.store)


def test_token_ids_take_the_smallest_dtype_and_the_mask_one_bit(tmp_path, tok):
    ds = load_dataset(DEMO, tok, 128, cache_dir=tmp_path)
    store = Path(ds.store)
    assert (store / "ids.bin").stat().st_size == 2 * ds.n_tokens  # 264 tokens: uint16
    assert (store / "trained.bin").stat().st_size == -(-ds.n_tokens // 8)


def test_a_damaged_store_is_not_trusted(tmp_path, tok):
    ds = load_dataset(DEMO, tok, 128, cache_dir=tmp_path)
    expected = dataset_digest(ds)
    ids = Path(ds.store) / "ids.bin"
    raw = bytearray(ids.read_bytes())
    raw[100] ^= 1
    ids.write_bytes(bytes(raw))
    again = load_dataset(DEMO, tok, 128, cache_dir=tmp_path)
    assert not again.cached and dataset_digest(again) == expected


def test_a_changed_file_gets_a_new_store(tmp_path, tok):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    first = load_dataset(data, tok, 64, cache_dir=tmp_path / "cache")
    data.write_text(json.dumps({"prompt": "a", "completion": "c"}) + "\n")
    second = load_dataset(data, tok, 64, cache_dir=tmp_path / "cache")
    assert not second.cached and second.store != first.store and second.examples[0].input_ids[-2] == 3 + ord("c")


def test_an_abandoned_preparation_is_removed_and_never_read(tmp_path, tok):
    dead = tmp_path / ".tmp-abc-999999999-x"
    dead.mkdir()
    (dead / "meta.json").write_text("{}")
    load_dataset(DEMO, tok, 128, cache_dir=tmp_path)
    assert not dead.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_line_writes_nothing_and_names_the_first_bad_line(tmp_path, tok, workers, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_LINES", 8)  # several chunks in a small file
    lines = [json.dumps({"text": f"t{i}"}) for i in range(60)]
    lines[37], lines[45] = "{oops", "[1]"
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:38: expected JSON"):
        load_dataset(data, tok, 64, cache_dir=tmp_path / "cache", workers=workers)
    assert list((tmp_path / "cache").iterdir()) == []
    ds = load_dataset(data, tok, 64, skip_bad_lines=True, cache_dir=tmp_path / "cache", workers=workers)
    assert [line for line, _ in ds.skipped] == [38, 46] and len(ds.examples) == 58


def test_worker_processes_give_the_same_store(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_LINES", 50)
    alone = load_dataset(DEMO, tok, 40)
    assert dataset_digest(load_dataset(DEMO, tok, 40, workers=2)) == dataset_digest(alone)


def test_chunks_close_at_their_line_or_byte_bound_and_keep_every_line(tmp_path):
    sizes = [10, 500, 3000, 20, 20, 20, 4000, 5, 5, 5, 5, 5, 9000, 1]
    data = tmp_path / "lines.jsonl"
    data.write_text("\n".join(json.dumps({"text": "x" * n}) for n in sizes) + "\n")
    chunks = list(prepare_module._chunks(data, 2, max_lines=4, max_bytes=3000))
    assert [lineno for chunk in chunks for lineno, _ in chunk] == list(range(2, len(sizes) + 1))
    for chunk in chunks:
        assert len(chunk) <= 4
        assert sum(len(line) for _, line in chunk[:-1]) < 3000  # only its last line may take it past
    assert [len(chunk) for chunk in chunks] == [2, 4, 4, 2, 1]  # (a line is its text + 12 bytes of JSON)


@pytest.mark.slow
def test_long_documents_are_prepared_in_bounded_memory_with_the_same_store(tmp_path, tok, monkeypatch):
    # 128 documents of 128 KB (16 MB): in one chunk their encodings took 1,282 MB; bounded by bytes, 156 MB.
    data = tmp_path / "books.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} " + "word " * 26_000}) + "\n" for i in range(128)))
    script = ("import resource, sys; from minilora.builtin import build_tokenizer; "
              "from minilora.data.dataset import load_dataset; tok = build_tokenizer(); "
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              "load_dataset(sys.argv[1], tok, 256, workers=0); "
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    import subprocess
    import sys

    grown_mb = int(subprocess.run([sys.executable, "-c", script, str(data)], check=True, capture_output=True,
                                  text=True).stdout)
    assert grown_mb < 600, grown_mb  # about one MiB of text's encodings at a time
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 1 << 40)  # lines only: every document in one chunk
    whole = load_dataset(data, tok, 256, workers=0)
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 200_000)
    assert dataset_digest(load_dataset(data, tok, 256, workers=0)) == dataset_digest(whole)


@pytest.mark.parametrize("template", ["builtin", "chatml"])
def test_one_rendering_spans_equal_the_per_turn_definition(template):
    tok = build_tokenizer()
    if template == "chatml":
        tok.chat_template = CHATML
    encoder = Encoder(tok, "chat")
    assert encoder.probe.regular
    chats = [[{"role": r, "content": c} for r, c in turns] for turns in TRICKY_CHATS]
    encoded = encoder.encode([{"messages": m} for m in chats]).split()
    for messages, (ids, trained) in zip(chats, encoded, strict=True):
        reference_ids, reference_trained = encoder._per_turn_spans(messages)
        assert ids.tolist() == reference_ids.tolist()
        assert trained.tolist() == reference_trained.tolist(), messages


def test_a_conversation_may_open_with_the_assistant(tok):
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}]
    ids, trained = Encoder(tok, "chat").encode([{"messages": messages}]).split()[0]
    text = tok.decode(ids[trained].tolist())
    assert text == "hi<|end|>\na<|end|>\n</s>"


def test_evaluation_is_capped_seeded_and_in_file_order():
    items = list(range(100))
    train, held = split_eval(items, 0.5, seed=1, max_examples=10)
    assert len(held) == 10 and len(train) == 90 and held == sorted(held) and sorted(train + held) == items
    assert held == split_eval(items, 0.5, seed=1)[1][:0] + split_eval(items, 0.5, seed=1, max_examples=10)[1]
    assert split_eval(items, 0.05, seed=1, max_examples=10) == split_eval(items, 0.05, seed=1)  # 5 < cap
    chosen = sample_eval(items, seed=3, max_examples=7)
    assert len(chosen) == 7 and chosen == sorted(chosen) and chosen == sample_eval(items, 3, 7)
    assert sample_eval(items, seed=3, max_examples=0) == items


def test_store_views_split_and_batch_like_lists(tmp_path, tok):
    ds = load_dataset(DEMO, tok, 128, cache_dir=tmp_path)
    as_list = list(ds.examples)
    train, held = split_eval(ds.examples, 0.1, seed=5, max_examples=20)
    train_l, held_l = split_eval(as_list, 0.1, seed=5, max_examples=20)
    assert [e.line for e in held] == [e.line for e in held_l] and len(train) == len(train_l)
    assert train.n_tokens == sum(len(e.input_ids) for e in train_l)
    assert train.n_targets == sum(e.n_targets for e in train_l)
    for packing in (False, True):
        a = make_batches(train, 4, 1, 3, 259, packing=packing, seq_len=128)
        b = make_batches(train_l, 4, 1, 3, 259, packing=packing, seq_len=128)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) and x.lines == y.lines


@pytest.mark.parametrize("packing", [False, True])
def test_shards_count_real_tokens_only(tok, packing):
    examples = load_dataset(DEMO, tok, 128).examples[:9]
    (batch,) = make_batches(examples, 9, 0, 0, 259, packing=packing, seq_len=128)[:1]
    parts = [shard(batch, DistInfo(rank, 2)) for rank in range(2)]
    assert sum(p.n_tokens for p in parts) == batch.n_tokens == examples.n_tokens
    assert sum(p.n_target_tokens for p in parts) == batch.n_target_tokens
    for p in parts:
        assert p.n_tokens == sum(int(np.sum(examples.lengths[[line - 1 for line in row]])) for row in p.lines)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    from minilora.data.cache import default_root

    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    assert default_root() == tmp_path / "data"
    monkeypatch.delenv("MINILORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "minilora" / "data"
    assert os.fspath(default_root()).endswith("minilora/data")


def test_the_training_job_caps_the_held_out_set_and_uses_the_cache(tmp_path, tok):
    from minilora.training.config import TrainConfig
    from minilora.training.job import prepare_data

    cfg = TrainConfig(data=str(DEMO), seq_len=128, eval_fraction=0.5, eval_max_examples=10,
                      data_cache=str(tmp_path))
    data = prepare_data(cfg, tok)
    assert len(data.eval_examples) == 10 and len(data.train_examples) == 502
    assert data.eval_source == f"10 examples (50%, at most 10) held out of {DEMO}"
    again = prepare_data(cfg, tok)
    assert again.train.cached and [e.line for e in again.eval_examples] == [e.line for e in data.eval_examples]
    cfg.eval_file, cfg.eval_fraction = str(DEMO), 0.0
    held = prepare_data(cfg, tok)
    assert len(held.eval_examples) == 10 and held.eval_source.endswith("(10 of 512 examples, a seeded sample)")


class CountingSlowTokenizer:
    """A tokenizer without a Rust backend whose every text costs a millisecond, counting what it encodes."""

    eos_token_id, bos_token_id, pad_token_id, chat_template = 1, None, 1, None

    def __init__(self):
        self.encoded = 0

    def __len__(self):
        return 260

    def get_vocab(self):
        return {chr(i): i for i in range(260)}

    def __call__(self, texts, add_special_tokens=True):
        self.encoded += len(texts)
        time.sleep(0.001 * len(texts))
        return {"input_ids": [[2 + ord(c) % 250 for c in text] for text in texts]}


def test_a_bad_line_deep_in_the_file_stops_the_run_before_the_lines_above_it_are_tokenized(tmp_path):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(3000)]
    lines[2990] = "{oops"
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    tokenizer = CountingSlowTokenizer()
    with pytest.raises(DataError, match=r"bad.jsonl:2991: expected JSON"):
        load_dataset(data, tokenizer, 64, workers=0)
    assert tokenizer.encoded <= 2 * prepare_module.CHUNK_LINES  # not the 2,990 lines above the bad one


def test_conversations_of_one_shape_share_a_rendering_that_equals_their_own(tok):
    template = ("{% for m in messages %}{{ '<|' + m['role'] + (('|' ~ m['name']) if m['name'] is defined else '') "
                "+ '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tok = build_tokenizer()
    tok.chat_template = template
    encoder = Encoder(tok, "chat")
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * i}] for i in range(4)]
    chats += [[{"role": "user", "content": "q", "name": name}, {"role": "assistant", "content": "a"}]
              for name in ("ann", "bob")]
    chats += [[{"role": "user", "content": "q", "name": flag}, {"role": "assistant", "content": "a"}]
              for flag in (1, True, 0.0, -0.0, [1], [1.0])]  # equal as keys, rendered differently
    encoded = encoder.encode([{"messages": m} for m in chats]).split()
    assert len(encoder.skeletons) == 9  # the unnamed shape once, then one per name value and type
    for messages, (ids, trained) in zip(chats, encoded, strict=True):
        fresh_ids, fresh_trained = Encoder(tok, "chat").encode([{"messages": messages}]).split()[0]
        text = tok.apply_chat_template(messages, tokenize=False)
        assert ids.tolist() == fresh_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert trained.tolist() == fresh_trained.tolist() == encoder._per_turn_spans(messages)[1].tolist()
