"""The built-in demo base model `builtin:tiny-phi3`, made in code so minilora runs with no model hub.

It has Phi-3's architecture (fused `qkv_proj` / `gate_up_proj`, so LoRA targets and PEFT key names are
the real ones) and Phi-3's chat format, at a size that trains in about a minute on two CPU cores:

    tokenizer  byte-level: id = 3 + byte, so any UTF-8 text round-trips; no merges
               <unk>=0 <s>=1 </s>=2 | bytes 3..258 | <|endoftext|>=259 (pad) <|assistant|> <|system|>
               <|end|> <|user|>                                                     -> 264 tokens
    model      Phi3ForCausalLM, hidden 256, MLP 688, 4 layers x 8 heads (head dim 32), 512 positions,
               random weights from a fixed seed -> ~3.3M parameters

`resolve_builtin("tiny-phi3")` saves it once under a cache folder so the rest of minilora loads it
exactly like a downloaded checkpoint (`from_pretrained` on a folder).
"""

import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from minilora.atomic import atomic_replace_dir
from minilora.cache_root import cache_root
from minilora.errors import UserError

# Bumped whenever the tokenizer or the weights change, so a stale cache folder is never reused.
VERSION = "v1"
KNOWN = ("tiny-phi3",)

BASE_SPECIALS = ("<unk>", "<s>", "</s>")
# Phi-3's chat markers; <|endoftext|> is Phi-3's pad token.
CHAT_SPECIALS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")

# Phi-3-mini-4k-instruct's template (current revision on the hub), re-typed: bos, then one
# `<|role|>\n...<|end|>\n` block per turn, then either the generation prompt or eos. The eos after the
# final turn teaches the model to stop; it is absent from earlier turns, which data.py accounts for.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A 264-token byte-level tokenizer with Phi-3's special tokens and chat template."""
    byte_chars = _byte_to_char()
    vocab = {tok: i for i, tok in enumerate(BASE_SPECIALS)}
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    # BPE with no merges is a plain byte lookup; use_regex=False keeps spaces inside one pre-token so
    # nothing is split or prefixed behind our back.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS + CHAT_SPECIALS])
    # Like Phi-3 (a Llama tokenizer) it prepends <s> when asked for special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(CHAT_SPECIALS[1:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> Phi3Config:
    # Sized so LoRA r=8 on a 2-core CPU does ~10 optimizer steps a second at batch 8 x ~50 tokens,
    # while the 4 layers still give attention something to adapt.
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return config


def build_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Phi3ForCausalLM:
    """Random-weight tiny Phi-3; the same seed gives bit-identical weights, and the caller's RNG is untouched."""
    config = build_config(build_tokenizer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config)
    return model.to(dtype).eval()


def _stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    # A chat reply ends with <|end|>; Phi-3's generation_config likewise stops on both.
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]


def save_builtin(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write model (fp32 safetensors), tokenizer and generation config to `path`; returns `path`."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=_stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    # A few MB written in a blink: transformers' progress bar would only clutter the output (and the
    # one-line errors of a first run whose data turns out to be bad).
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return path


def default_cache_dir() -> Path:
    return cache_root() / "builtin"


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def resolve_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the saved builtin model `name` (with or without `builtin:`), built on first use.

    The folder appears atomically, so an interrupted first build leaves nothing that looks complete.
    """
    name = name.removeprefix("builtin:")
    if name not in KNOWN:
        raise UserError(f"unknown builtin model 'builtin:{name}'; known: {', '.join('builtin:' + k for k in KNOWN)}")
    target = Path(cache_dir or default_cache_dir()) / f"{name}-{VERSION}"
    if not _is_complete(target):
        atomic_replace_dir(save_builtin, target)
    return target
