"""Generate text from a base model with a LoRA adapter: minilora's LoRA layers over the 4-bit base,
decoded by transformers' `generate` with the KV cache.

    prompt ─► tokens (plain, or the chat template with --chat) ─► model.generate(use_cache=True)
           ─► each step: LoRALinear ─► dispatch.py ─► fused NF4+LoRA Triton kernel on CUDA, PyTorch on CPU
           ─► new tokens until eos / <|end|> / --max-new-tokens ─► decoded text

Greedy unless --temperature > 0. PEFT's path (the "How to Get Started" snippet of the model card each
run writes) reads the same adapter folder; tests/test_generate.py checks both paths give the same tokens.

    python -m minilora.generate --adapter out/ --prompt "The weather is good today." [--chat]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from jinja2 import TemplateError
from torch import nn

from minilora.adapted_model import load_trained, resolve_trained
from minilora.cli_runner import run_cli
from minilora.errors import UserError, shown
from minilora.quant import load_tokenizer

DEFAULT_MAX_NEW_TOKENS = 256
CHAT_END = "<|end|>"  # Phi-3's end of a chat turn; a reply stops there as at eos


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Prompt token ids: plain text (with bos, as `tokenizer(prompt)` gives), or one user turn rendered by
    the chat template and followed by the assistant's generation prompt."""
    if not chat:
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: the tokenizer has no chat template; leave out --chat for plain text")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    except (TemplateError, ValueError) as err:  # a template may refuse a conversation with raise_exception
        raise UserError(f"--chat: the tokenizer's chat template refused the prompt ({err})") from err
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes bos itself


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The model's own stop ids (Phi-3 lists eos and <|end|>), plus eos and <|end|> where the tokenizer has
    them, so a chat reply stops at the end of its turn even when generation_config names only eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    for extra in (tokenizer.eos_token_id, tokenizer.get_vocab().get(CHAT_END)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def prepare_for_generation(model: nn.Module) -> nn.Module:
    """Eval mode (no LoRA dropout) and the KV cache back on: load_base switches it off for training."""
    model.eval()
    model.config.use_cache = True
    return model


# Sampling divides the logits by the temperature: below this they overflow to inf and the softmax gives
# NaN (1e-300 does); above, the distribution is uniform to float precision. 0 means greedy.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
MAX_NEW_TOKENS = 1 << 20  # and at most the model's context, checked once it is loaded
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
MAX_PROMPT_FILE_BYTES = 64 << 20  # read whole into memory: prompts, not a corpus


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> None:
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens {shown(max_new_tokens)}: must be in [1, {MAX_NEW_TOKENS:,}]")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise UserError(f"--temperature {shown(temperature)}: must be 0 (greedy) or in "
                        f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {shown(top_p)}: must be in (0, 1]")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {shown(seed)}: must be in [0, 2**63)")


def _check_context(model: nn.Module, n_prompt: int, max_new_tokens: int) -> None:
    """The prompt and the reply must fit the model's positions (a longer request only grows the KV cache)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and n_prompt + max_new_tokens > context:
        raise UserError(f"--max-new-tokens {max_new_tokens:,}: with the prompt's {n_prompt:,} tokens that is more "
                        f"than the model's {context:,} positions")


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> list[int]:
    """The new token ids (stop token included when one ended the reply).

    model           a causal LM (load_for_generation's, or any transformers model)
    tokenizer       its tokenizer (pad and stop tokens come from it and the model's generation config)
    prompt_ids      the prompt's token ids (encode_prompt renders a chat prompt)
    max_new_tokens  at most this many new tokens
    temperature     0: greedy; above 0: sampling at this temperature (torch's generator decides the draws)
    top_p           nucleus sampling's probability mass (1: off); only with temperature > 0
    use_cache       the KV cache (same tokens either way; off is slower, for checking)
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    input_ids = torch.tensor([prompt_ids], device=model.device)  # (1, T)
    if temperature > 0:
        # top_k=0: only temperature and top-p shape the distribution (transformers would add top-k 50).
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    else:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        use_cache=use_cache,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=pad_id,
        **sampling,
    )  # (1, T + new)
    return out[0, len(prompt_ids):].tolist()


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> str:
    """The model's continuation of `prompt` (only the new text, special tokens dropped). `chat`: render
    the prompt as one user turn with the tokenizer's chat template; the rest as in `generate_ids`."""
    ids = generate_ids(model, tokenizer, encode_prompt(tokenizer, prompt, chat), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p)
    return tokenizer.decode(ids, skip_special_tokens=True)


def load_for_generation(
    adapter: str | Path | None = None,
    model: str | None = None,
    quant: str | None = None,
    device: torch.device | str | None = None,
):
    """(model, tokenizer): the base (`model`, default the adapter's base_model_name_or_path) loaded as the
    adapter was trained (quant and compute dtype from its run.json, else nf4 and the device's default;
    `quant` overrides), with the adapter on it."""
    setup = resolve_trained(adapter, model, quant)
    tokenizer = load_tokenizer(setup.base)
    return prepare_for_generation(load_trained(setup, adapter, device)), tokenizer


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such prompt file (--prompt-file)")
    if p.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise UserError(f"{path}: {p.stat().st_size:,} bytes of prompts is more than --prompt-file reads "
                        f"({MAX_PROMPT_FILE_BYTES:,}); split it")
    try:
        prompts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from err
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line)")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minilora.generate",
        description="Generate text with a base model and a LoRA adapter (greedy unless --temperature > 0).",
    )
    parser.add_argument("--adapter", help="adapter folder (adapter_config.json + safetensors); omit for the base")
    parser.add_argument("--model", help="base model (default: base_model_name_or_path of the adapter config)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="one prompt per line; prints one JSON line per prompt")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"longest reply in tokens (default: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass, with --temperature > 0 (default: 1.0)")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--quant", help="base weights: nf4, fp4 or none (default: as trained per run.json, else nf4)")
    parser.add_argument("--show-prompt", action="store_true", help="print the prompt (as the model saw it) first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # before the model is loaded
    prompts = read_prompts(args.prompt_file) if args.prompt_file else [args.prompt]
    model, tokenizer = load_for_generation(args.adapter, args.model, args.quant)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, args.chat)
        _check_context(model, len(ids), args.max_new_tokens)
        new = generate_ids(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if args.prompt_file:
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False), flush=True)
            continue
        if args.show_prompt:
            # Chat prompts are shown with their template markers: that is what the model continued.
            print(tokenizer.decode(ids, skip_special_tokens=not args.chat), end="" if not args.chat else "\n")
        print(text, flush=True)
    return 0


def cli() -> None:
    """Console entry point: every failure is one `error:` line and an exit code (minilora/cli_runner.py)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
