"""Generation: our LoRA model decodes the same tokens as PEFT on the same adapter folder, with or
without the KV cache, and the model card's "How to Get Started" snippet runs on a minilora adapter."""

import contextlib
import io
import json
import runpy
import shutil
import sys

import bitsandbytes as bnb
import pytest
import torch
from lora_utils import randomize_lora
from peft import PeftModel
from torch import nn

import minilora
from minilora.generate import encode_prompt, generate, generate_ids, load_for_generation, main, stop_token_ids
from minilora.quant import load_tokenizer, resolve_model_path
from minilora.training.card import CARD

BASE = "builtin:tiny-phi3"
PROMPT = "The weather is good today."


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A minilora adapter for the builtin model whose update changes the greedy continuation."""
    model = minilora.load_base(BASE)
    minilora.add_lora(model)
    randomize_lora(model, std=0.5)
    return minilora.save_adapter(model, tmp_path_factory.mktemp("gen") / "adapter")


@pytest.fixture(scope="module")
def ours(adapter):
    return load_for_generation(adapter)  # nf4 base, as train.py's default


def test_greedy_tokens_equal_peft_on_the_same_4bit_base_and_adapter(adapter, ours):
    model, tokenizer = ours
    ids = encode_prompt(tokenizer, PROMPT)
    tokens = generate_ids(model, tokenizer, ids, max_new_tokens=10)
    peft_model = PeftModel.from_pretrained(minilora.load_base(BASE), str(adapter)).eval()
    assert generate_ids(peft_model, tokenizer, ids, max_new_tokens=10) == tokens
    with minilora.disable_adapter(model):
        assert generate_ids(model, tokenizer, ids, max_new_tokens=10) != tokens  # the adapter is in play


def test_kv_cache_on_and_off_give_identical_greedy_tokens(ours):
    model, tokenizer = ours
    ids = encode_prompt(tokenizer, "hi", chat=True)
    with_cache = generate_ids(model, tokenizer, ids, max_new_tokens=12, use_cache=True)
    assert generate_ids(model, tokenizer, ids, max_new_tokens=12, use_cache=False) == with_cache
    assert model.config.use_cache  # load_base turned it off for training; generation turns it back on


def card_snippet(base_model: str, adapter_path: str) -> str:
    """The model card's "How to Get Started" code, as render_card fills it in (training/card.py)."""
    section = CARD.split("## How to Get Started with the Model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    return code.format(base_model=base_model, adapter_path=adapter_path)


# The snippet sets no length, so transformers warns that it falls back to 20 new tokens.
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default:UserWarning")
def test_model_card_snippet_runs_on_our_adapter_and_matches_our_generate(adapter):
    snippet = card_snippet(resolve_model_path(BASE), str(adapter))
    assert "PeftModel.from_pretrained(model, lora_adapter)" in snippet  # the card's code, not a test's copy
    scope, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "model card snippet", "exec"), scope)
    inputs, outputs = scope["inputs"], scope["outputs"]
    snippet_new = outputs[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(snippet_new) > 0
    ours_model, ours_tokenizer = load_for_generation(adapter, quant="none")  # the snippet's fp32 base
    ids = encode_prompt(ours_tokenizer, scope["prompt"])
    assert ids == inputs["input_ids"][0].tolist()
    assert generate_ids(ours_model, ours_tokenizer, ids, max_new_tokens=len(snippet_new)) == snippet_new
    ours = scope["prompt"] + generate(ours_model, ours_tokenizer, scope["prompt"], max_new_tokens=len(snippet_new))
    assert printed.getvalue() == ours + "\n"


def test_the_base_is_loaded_in_the_trained_compute_dtype(adapter, tmp_path):
    """run.json says bf16: the base is loaded (and its 4-bit layers compute) in bf16, as in training,
    not in the CPU's default fp32."""
    trained = tmp_path / "run"
    shutil.copytree(adapter, trained)
    (trained / "run.json").write_text(json.dumps({"config": {"quant": "nf4"}, "compute_dtype": "torch.bfloat16"}))
    model, _ = load_for_generation(trained)
    assert model.dtype == torch.bfloat16
    qkv = model.model.layers[0].self_attn.qkv_proj.base_layer
    assert isinstance(qkv, bnb.nn.Linear4bit) and qkv.compute_dtype == torch.bfloat16
    default, _ = load_for_generation(adapter)  # no run.json: the device's default
    assert default.dtype == torch.float32


def test_a_chat_template_that_refuses_the_prompt_is_a_user_error():
    tokenizer = load_tokenizer(BASE)
    tokenizer.chat_template = "{{ raise_exception('only system turns, please') }}"
    with pytest.raises(minilora.UserError, match="--chat: the tokenizer's chat template refused the prompt "
                                                 r"\(only system turns, please\)"):
        encode_prompt(tokenizer, "hi", chat=True)


def test_chat_prompt_is_one_user_turn_and_the_assistant_prompt(ours):
    _, tokenizer = ours
    byte_ids = [3 + b for b in b"hi"]  # the builtin tokenizer: id = 3 + byte
    newline, bos, user, end, assistant = 3 + 10, 1, 263, 262, 260
    expected = [bos, user, newline, *byte_ids, end, newline, assistant, newline]
    assert encode_prompt(tokenizer, "hi", chat=True) == expected
    assert encode_prompt(tokenizer, "hi") == [bos, *byte_ids]


def test_reply_stops_at_end_of_turn_even_if_generation_config_names_only_eos(ours):
    model, tokenizer = ours
    head, configured = model.lm_head, model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    try:
        # A head that always prefers <|end|> (262): the reply must be that one token, then stop.
        model.lm_head = nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.bias.zero_()
            model.lm_head.bias[262] = 10.0
        assert stop_token_ids(model, tokenizer) == [2, 262]
        assert generate_ids(model, tokenizer, [1, 3 + ord("a")], max_new_tokens=8) == [262]
        assert generate(model, tokenizer, "a", max_new_tokens=8) == ""  # special tokens are not printed
    finally:
        model.lm_head = head
        model.generation_config.eos_token_id = configured


def test_sampling_is_reproducible_with_a_seed(ours):
    model, tokenizer = ours
    ids = encode_prompt(tokenizer, PROMPT)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate_ids(model, tokenizer, ids, max_new_tokens=8, temperature=1.0, top_p=0.9))
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_cli_missing_adapter_is_one_error_line(tmp_path, run_command):
    code, out, err = run_command(main, ["--adapter", str(tmp_path / "nope"), "--prompt", "hi"])
    assert code == 2 and out == ""
    assert err == f"error: {tmp_path / 'nope'}: no such adapter folder\n"


def test_cli_bad_sampling_values_are_one_error_line(adapter, run_command):
    code, _, err = run_command(main, ["--adapter", str(adapter), "--prompt", "hi", "--top-p", "0"])
    assert code == 2 and err == "error: --top-p 0.0: must be in (0, 1]\n"


def test_cli_prompt_file_prints_one_json_line_per_prompt(adapter, ours, tmp_path, run_command):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\nThe weather is good today.\n")
    argv = ["--adapter", str(adapter), "--prompt-file", str(prompts), "--max-new-tokens", "6"]
    code, out, _ = run_command(main, argv)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    model, tokenizer = ours
    assert rows == [{"prompt": p, "completion": generate(model, tokenizer, p, max_new_tokens=6)}
                    for p in ("hello", PROMPT)]


# runpy warns that the module it runs as __main__ was imported already (by this file): expected here.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_module_cli_generates_text(adapter, capsys, monkeypatch):
    # `python -m minilora.generate ...`, run in this process (a fresh interpreter costs ~10 s here).
    argv = ["--adapter", str(adapter), "--prompt", PROMPT, "--max-new-tokens", "5", "--show-prompt"]
    monkeypatch.setattr(sys, "argv", ["minilora.generate", *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("minilora.generate", run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and len(out) > len(PROMPT) + 1
