"""The built-in tiny Phi-3: tokenizer, chat template, deterministic weights, save/load round trip."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

from minilora.builtin import build_model, build_tokenizer, resolve_builtin
from minilora.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return resolve_builtin("builtin:tiny-phi3", tmp_path_factory.mktemp("cache"))


def test_tokenizer_is_bytes_plus_phi3_specials(tok):
    assert len(tok) == 264
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 259)
    specials = ["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    assert tok.convert_tokens_to_ids(specials) == [260, 261, 262, 263]
    # A marker inside text is one token, like Phi-3's.
    assert tok("a<|end|>", add_special_tokens=False)["input_ids"] == [3 + ord("a"), 262]


def test_tokenizer_round_trips_any_utf8(tok):
    text = "Grüße, 日本語 ✓ 🙂\ttab\nnew line  two spaces \x00"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [3 + b for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


def test_tokenizer_prepends_bos_only_when_asked(tok):
    assert tok("hi")["input_ids"] == [1, 3 + ord("h"), 3 + ord("i")]
    assert tok("hi", add_special_tokens=False)["input_ids"] == [3 + ord("h"), 3 + ord("i")]


def test_chat_template_has_phi3_shape(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n</s>"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"


def test_model_is_deterministic_per_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_model(seed=0), build_model(seed=0), build_model(seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_model_shape_matches_tokenizer(tok):
    model = build_model(dtype=torch.bfloat16)
    assert isinstance(model, Phi3ForCausalLM)
    assert model.dtype == torch.bfloat16
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    logits = model(input_ids=torch.tensor([[1, 50, 60]])).logits  # (1, 3, V)
    assert logits.shape == (1, 3, len(tok))


def test_saved_builtin_loads_with_from_pretrained(saved, tok):
    model = AutoModelForCausalLM.from_pretrained(saved)
    reference = build_model()
    for (name, pa), pb in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    loaded = AutoTokenizer.from_pretrained(saved)
    text = "<|user|>\nßx<|end|>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 259)
    assert model.generation_config.eos_token_id == [2, 262]  # </s> and <|end|>


def test_resolve_builtin_reuses_the_cached_folder(saved):
    before = (saved / "model.safetensors").stat().st_mtime_ns
    assert resolve_builtin("tiny-phi3", saved.parent) == saved
    assert (saved / "model.safetensors").stat().st_mtime_ns == before
    assert saved.name == "tiny-phi3-v1"


def test_unknown_builtin_lists_known_names(tmp_path):
    with pytest.raises(UserError, match="unknown builtin model 'builtin:gpt5'; known: builtin:tiny-phi3"):
        resolve_builtin("builtin:gpt5", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_every_cache_lives_under_one_root(monkeypatch, tmp_path):
    """The built-in models and the prepared data share one root, decided in one place (cache_root.py)."""
    from minilora.builtin import default_cache_dir
    from minilora.data.cache import default_root

    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path / "mine"))
    assert (default_cache_dir(), default_root()) == (tmp_path / "mine" / "builtin", tmp_path / "mine" / "data")
    monkeypatch.delenv("MINILORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "minilora" / "builtin"
    assert default_root() == tmp_path / "xdg" / "minilora" / "data"
