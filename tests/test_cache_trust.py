"""A data-cache store is used only when what it records having been made from matches what is asked for:
a folder's name proves nothing (folders swapped, copied or edited by hand)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from test_data_pins import dataset_digest

from minilora.builtin import build_tokenizer
from minilora.data.dataset import load_dataset
from minilora.errors import UserError

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.jsonl"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def alpaca_and_text(tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(DEMO.read_text().splitlines()[:40]) + "\n")
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(30)))
    return alpaca, text


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def test_swapped_store_folders_are_not_trusted_by_name(tmp_path, tok, alpaca_and_text):
    alpaca, text = alpaca_and_text
    cache = tmp_path / "cache"
    a, t = load_dataset(alpaca, tok, 64, cache_dir=cache), load_dataset(text, tok, 64, cache_dir=cache)
    want = dataset_digest(load_dataset(alpaca, tok, 64))
    _swap(Path(a.store), Path(t.store))
    again = load_dataset(alpaca, tok, 64, cache_dir=cache)
    assert again.fmt == "alpaca" and not again.cached  # prepared afresh, not the text file's tokens
    assert dataset_digest(again) == want
    assert load_dataset(alpaca, tok, 64, cache_dir=cache).cached  # and the new store is used from then on


def test_a_store_of_another_seq_len_copied_under_the_key_is_not_used(tmp_path, tok):
    cache = tmp_path / "cache"
    short, long = load_dataset(DEMO, tok, 32, cache_dir=cache), load_dataset(DEMO, tok, 128, cache_dir=cache)
    shutil.rmtree(long.store)
    shutil.copytree(short.store, long.store)
    again = load_dataset(DEMO, tok, 128, cache_dir=cache)
    assert not again.cached and max(again.examples.lengths) > 32


@pytest.mark.parametrize("meta", ["[]", "null", '{"identity": 1}', '"x"', "{" * 50_000])
def test_a_meta_that_is_not_a_stores_is_prepared_again(tmp_path, tok, meta):
    cache = tmp_path / "cache"
    first = load_dataset(DEMO, tok, 64, cache_dir=cache)
    (Path(first.store) / "meta.json").write_text(meta)
    again = load_dataset(DEMO, tok, 64, cache_dir=cache)
    assert not again.cached and dataset_digest(again) == dataset_digest(first)


@pytest.mark.parametrize("make", ["file", "dev_null"])
def test_a_cache_root_that_cannot_be_a_folder_is_one_line(tmp_path, tok, make):
    root = tmp_path / "cache_file" if make == "file" else Path("/dev/null")
    if make == "file":
        root.write_text("not a folder")
    with pytest.raises(UserError, match=rf"^data cache {root}: cannot be used as a folder"):
        load_dataset(DEMO, tok, 64, cache_dir=root)
    with pytest.raises(UserError, match="cannot be used as a folder"):
        load_dataset(DEMO, tok, 64, cache_dir=root / "sub")
