"""train.py's command line: every flag documented, config files, precedence."""

import pytest
from train_utils import DEMO

from minilora.errors import UserError
from minilora.training.cli import build_parser, parse_config, run
from minilora.training.config import TrainConfig

ISSUE_FLAGS = ["--model", "--output", "--r", "--alpha", "--dropout", "--targets", "--rslora", "--quant", "--epochs",
               "--max-steps", "--batch-size", "--grad-accum", "--lr", "--warmup-steps", "--seq-len", "--eval-fraction",
               "--eval-file", "--eval-every", "--save-every", "--seed", "--precision", "--recompute", "--padding",
               "--batch-tokens", "--kernels", "--resume", "--packing", "--config"]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
    assert "microsoft/Phi-3-mini-4k-instruct" in text and "default: 8" in text


def test_defaults_are_the_seed_card_recipe():
    cfg = parse_config(["--data", str(DEMO)])
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.quant) == (8, 16, 0.05, "nf4")
    assert cfg.targets == ["query_key_value", "o_proj", "qkv_proj", "gate_up_proj", "down_proj"]
    assert cfg.model == "microsoft/Phi-3-mini-4k-instruct" and cfg.recompute == "selective"


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


def test_targets_accept_spaces_or_commas():
    cfg = parse_config(["--data", str(DEMO), "--targets", "qkv_proj,o_proj", "down_proj"])
    assert cfg.targets == ["qkv_proj", "o_proj", "down_proj"]
