"""train.py's command line: every flag documented, config files, precedence."""

import re
import subprocess
import sys

import pytest
from train_utils import DEMO, ROOT

from minilora.errors import UserError
from minilora.training.cli import build_parser, parse_config, run
from minilora.training.config import TrainConfig

DOCUMENTED_FLAGS = ["--model", "--output", "--r", "--alpha", "--dropout", "--targets", "--rslora", "--quant",
                    "--epochs", "--max-steps", "--batch-size", "--grad-accum", "--lr", "--warmup-steps",
                    "--seq-len", "--eval-fraction", "--eval-file", "--eval-every", "--save-every", "--seed",
                    "--precision", "--recompute", "--recompute-every", "--padding", "--batch-tokens",
                    "--kernels", "--resume", "--packing", "--config"]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in DOCUMENTED_FLAGS:
        assert flag in text, flag
    assert "microsoft/Phi-3-mini-4k-instruct" in text and "default: 8" in text


# Runs train.py --help as a user would, then reports which heavy libraries that imported.
HELP_PROBE = """
import runpy, sys
sys.argv = ["train.py", "--help"]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as done:
    assert done.code == 0, done.code
print("imported:", sorted(m for m in ("torch", "transformers", "bitsandbytes") if m in sys.modules), file=sys.stderr)
"""


def test_help_imports_neither_torch_nor_transformers_nor_bitsandbytes():
    done = subprocess.run([sys.executable, "-c", HELP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "imported: []"
    for flag in DOCUMENTED_FLAGS:
        assert flag in done.stdout, flag


def test_defaults_are_the_recipe_of_the_model_card_in_minilora_recipe():
    cfg = parse_config(["--data", str(DEMO)])
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.quant) == (8, 16, 0.05, "nf4")
    assert cfg.targets == ["query_key_value", "o_proj", "qkv_proj", "gate_up_proj", "down_proj"]
    assert cfg.model == "microsoft/Phi-3-mini-4k-instruct" and cfg.recompute == "auto"
    assert cfg.recompute_every == 1


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "lr: 0.001\nbatch-size: 2\ntargets: [qkv_proj, o_proj]\nrslora: true\n"),
    (".toml", 'lr = 0.001\nbatch_size = 2\ntargets = "qkv_proj,o_proj"\nrslora = true\n'),
])
def test_config_file_gives_the_same_keys_and_flags_win(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(f"data: {DEMO}\n" + text if suffix == ".yaml" else f'data = "{DEMO}"\n' + text)
    cfg = parse_config(["--config", str(path), "--batch-size", "8"])
    assert cfg.lr == 0.001 and cfg.rslora is True and cfg.targets == ["qkv_proj", "o_proj"]
    assert cfg.batch_size == 8  # the flag wins over the file
    assert isinstance(cfg, TrainConfig)


def test_config_file_errors_name_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"run.yaml: unknown key 'learning_rate'"):
        parse_config(["--config", str(path), "--data", str(DEMO)])
    path.write_text("lr: fast\n")
    assert run(["--config", str(path), "--data", str(DEMO)]) == 2
    assert "run.yaml: 'lr' must be float, got 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("key,replacement", [
    ("gradient_checkpointing", "recompute (none: no recompute) and recompute_every"),
    ("grad-checkpointing", "recompute (none: no recompute) and recompute_every"),
    ("checkpoint_every", "recompute_every")])
def test_config_file_keys_of_other_trainers_name_minilora_s_key(tmp_path, key, replacement):
    path = tmp_path / "run.yaml"
    path.write_text(f"{key}: 2\n")
    with pytest.raises(UserError, match=rf"run.yaml: key '{key}': minilora calls it {re.escape(replacement)}$"):
        parse_config(["--config", str(path), "--data", str(DEMO)])


def test_recompute_every_zero_points_to_recompute_none():
    message = "--recompute-every 0: must be at least 1 (for no recompute give --recompute none)"
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        parse_config(["--data", str(DEMO), "--recompute-every", "0"])


@pytest.mark.parametrize("line,message", [
    ("r: 3.7", "'r' must be int, got 3.7"),
    ("r: true", "'r' must be int, got True"),
    ("output: null", "'output' must be str, got None"),
    ("model: 7", "'model' must be str, got 7"),
    ("lr: '0.001'", "'lr' must be float, got '0.001'"),
    ("packing: 'yes'", "'packing' must be true or false, got 'yes'"),
    ("targets: [qkv_proj, 3]", "'targets' must be a list of module names"),
    ("targets: []", "'targets' must be a list of module names"),
    ("r: " + "[" * 5000, "cannot parse (nested more than 32 deep)"),  # where the 33rd level opens: line 1
])
def test_config_file_values_must_have_the_fields_type(tmp_path, line, message):
    path = tmp_path / "run.yaml"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=re.escape("run.yaml") + "(, line 1)?: " + re.escape(message)):
        parse_config(["--config", str(path), "--data", str(DEMO)])


def test_config_file_ints_are_fine_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1\nalpha: 32\n")
    cfg = parse_config(["--config", str(path), "--data", str(DEMO)])
    assert (cfg.lr, cfg.alpha) == (1.0, 32.0) and isinstance(cfg.lr, float)


def test_targets_accept_spaces_or_commas():
    cfg = parse_config(["--data", str(DEMO), "--targets", "qkv_proj,o_proj", "down_proj"])
    assert cfg.targets == ["qkv_proj", "o_proj", "down_proj"]


def test_the_package_exports_its_public_names_on_first_use():
    import minilora

    assert set(minilora.__all__) == {
        "DEFAULT_TARGETS", "AdapterError", "DataError", "LoRALinear", "UserError", "add_lora", "count_parameters",
        "disable_adapter", "load_adapter", "load_base", "load_tokenizer", "lora_layers", "lora_parameters",
        "merge_lora", "print_trainable", "read_adapter_config", "save_adapter", "set_adapter_enabled",
        "set_kernel_mode", "trainable_summary", "unmerge_lora"}
    assert all(getattr(minilora, name) is not None for name in minilora.__all__)
    assert minilora.dispatch.default_mode() in ("auto", "triton", "torch")  # submodules as attributes, as before
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        minilora.nope  # noqa: B018
