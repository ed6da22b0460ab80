"""Shared fixtures: tiny models built from configs (no hub), saved to temporary folders."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
# the kernels. Without a GPU the kernels run in Triton's interpreter: same code path, slow.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)

TINY_CONFIGS = {
    "phi3": lambda: Phi3Config(**SMALL, num_key_value_heads=4, pad_token_id=0),
    "llama": lambda: LlamaConfig(**SMALL, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=2),
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL),
}


@pytest.fixture
def run_command(capsys):
    """`run_command(main, argv)` runs a command line's `main` as its console script does: (exit code,
    stdout, the `error` lines of stderr joined, each ending in a newline; loading bars are not errors)."""
    from minilora.cli_runner import run_cli

    def call(main, argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run_cli(main, argv)
        captured = capsys.readouterr()
        errors = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("error")]
        return code, captured.out, "".join(line + "\n" for line in errors)

    return call


def save_tiny(kind: str, folder) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind](), dtype=torch.float32)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """kind -> folder of a saved tiny random model of that architecture (made once per session)."""
    made = {}

    def get(kind: str = "phi3") -> str:
        if kind not in made:
            made[kind] = save_tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def small_chat_model(tmp_path_factory) -> str:
    """Folder of builtin:tiny-phi3's tokenizer on a hidden-64, 2-layer Phi-3 (train_utils.save_small_chat_model),
    saved once per session: for whole training runs whose cost grows with the model."""
    from train_utils import save_small_chat_model

    return save_small_chat_model(tmp_path_factory.mktemp("small-chat-phi3"))
