"""Every numeric setting has a range checked before anything is allocated; parsing is bounded (YAML
aliases, digits, nesting); no message formats an unbounded value."""

import dataclasses
import resource
import time

import pytest
from train_utils import DEMO, argv_for

from minilora import generate, merge
from minilora.errors import shown
from minilora.training.cli import run
from minilora.training.config import UPPER_BOUNDS, TrainConfig


def test_every_numeric_setting_has_an_upper_bound():
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type in (int, float, "int", "float")}
    assert numeric == set(UPPER_BOUNDS)


@pytest.fixture
def no_model_load(monkeypatch):
    loaded = []
    monkeypatch.setattr("minilora.training.job.load_base", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr("minilora.training.job.load_tokenizer", lambda *a, **k: loaded.append(1))
    return loaded


@pytest.mark.parametrize("flags,fragment", [
    (["--grad-accum=99999999999999999999"], "--grad-accum 99999999999999999999: must be at most 1,024"),
    (["--grad-accum=5000"], "--grad-accum 5000: must be at most 1,024"),
    (["--seq-len=" + "9" * 4000], "--seq-len <an integer of about 4,000 digits>: must be at most 1,048,576"),
    (["--seq-len=100000000000000000000"], "--seq-len 100000000000000000000: must be at most 1,048,576"),
    (["--batch-size=10000000"], "--batch-size 10000000: must be at most 65,536"),
    (["--lora-plus-ratio=1e308"], "--lora-plus-ratio 1e+308: must be at most 10000"),
    (["--lr=1e308"], "--lr 1e+308: must be at most 1"),
    (["--lr=3"], "--lr 3.0: must be at most 1"),
    (["--alpha=1e30"], "--alpha 1e+30: must be at most 1e+06"),
    (["--r=100000"], "--r 100000: must be at most 65,536"),
    (["--epochs=1e300"], "--epochs 1e+300: must be at most 1e+06"),
    (["--max-steps=1000000000000"], "--max-steps 1000000000000: must be at most 1,000,000,000"),
    (["--batch-tokens=99999999999"], "--batch-tokens 99999999999: must be at most 16,777,216"),
    (["--keep-checkpoints=10000000"], "--keep-checkpoints 10000000: must be at most 1,000,000"),
])
def test_out_of_range_flags_are_one_line_before_anything_loads(tmp_path, capsys, no_model_load, flags, fragment):
    assert run(argv_for(tmp_path / "out", DEMO, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {fragment}" and not no_model_load and not (tmp_path / "out").exists()


def test_a_flag_of_thousands_of_digits_is_refused_with_a_short_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run(argv_for(tmp_path / "out", DEMO, "--r=" + "9" * 5000))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "invalid int value" in err and len(err) < 2000


CONFIGS = {
    "alias bomb": ("run.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
        + "targets: *i\n", "uses a YAML alias"),
    "alias of a scalar": ("run.yaml", "x: &n 8\nr: *n\n", "uses a YAML alias (*n)"),
    "5000-digit r (yaml)": ("run.yaml", "r: " + "9" * 5000 + "\n", "cannot parse (Exceeds the limit"),
    "5000-digit r (toml)": ("run.toml", "r = " + "9" * 5000 + "\n", "cannot parse"),
    "4000-digit r (yaml)": ("run.yaml", "r: " + "9" * 4000 + "\n", "--r <an integer of about 4,000 digits>: must be"),
    "huge float": ("run.yaml", "lr: 1.0e+308\n", "--lr 1e+308: must be at most 1"),
    "long targets": ("run.yaml", "targets: [" + ", ".join(["5"] * 20_000) + "]\n", "'targets' must be a list of"),
    "1 MiB of nesting": ("run.yaml", "r: " + "[" * ((1 << 20) - 16) + "\n", "cannot parse (nested more than 32"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hostile_config_files_are_one_short_line_in_bounded_memory(tmp_path, capsys, no_model_load, case):
    name, text, fragment = CONFIGS[case]
    (tmp_path / name).write_text(text)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    assert run(["--config", str(tmp_path / name), "--data", str(DEMO), "--output", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB: under 200 MB
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and len(err) < 400, err


@pytest.mark.parametrize("argv,fragment", [
    (["--temperature", "1e-300"], "--temperature 1e-300: must be 0 (greedy) or in [0.001, 1000]"),
    (["--temperature", "nan"], "--temperature nan: must be 0"),
    (["--temperature", "1e308"], "--temperature 1e+308: must be 0"),
    (["--seed", str(10**23)], "--seed 100000000000000000000000: must be in [0, 2**63)"),
    (["--seed", "-1"], "--seed -1: must be in [0, 2**63)"),
    (["--max-new-tokens", str(10**12)], "--max-new-tokens 1000000000000: must be in [1, 1,048,576]"),
    (["--top-p", "nan"], "--top-p nan: must be in (0, 1]"),
])
def test_generate_refuses_out_of_range_sampling_before_loading(tmp_path, run_command, monkeypatch, argv, fragment):
    monkeypatch.setattr(generate, "load_for_generation", lambda *a, **k: pytest.fail("loaded the model"))
    code, _, err = run_command(generate.main, ["--adapter", str(tmp_path), "--prompt", "hi", *argv])
    assert code == 2 and err.startswith(f"error: {fragment}") and err.count("\n") == 1


def test_generate_refuses_a_prompt_file_too_large_to_read(tmp_path, run_command, monkeypatch):
    monkeypatch.setattr(generate, "MAX_PROMPT_FILE_BYTES", 1000)
    (tmp_path / "p.txt").write_text("hi\n" * 1000)
    argv = ["--model", "builtin:tiny-phi3", "--prompt-file", str(tmp_path / "p.txt")]
    code, _, err = run_command(generate.main, argv)
    assert code == 2 and err == f"error: {tmp_path / 'p.txt'}: 3,000 bytes of prompts is more than --prompt-file " \
        "reads (1,000); split it\n"


def test_generate_refuses_a_reply_longer_than_the_models_context(run_command, tmp_path):
    code, _, err = run_command(generate.main, ["--model", "builtin:tiny-phi3", "--prompt", "hi",
                                               "--max-new-tokens", "100000"])
    assert code == 2 and "more than the model's 512 positions" in err


@pytest.mark.parametrize("device,fragment", [("cuda", "this machine has no CUDA GPU; use --device cpu"),
                                             ("cuda:7", "this machine has"),
                                             ("tpu", "--device 'tpu': Expected one of")])
def test_merge_checks_the_device_before_loading(tmp_path, run_command, monkeypatch, device, fragment):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    from test_adapter_validation import _write_adapter

    adapter = _write_adapter(tmp_path / "a")
    monkeypatch.setattr(merge, "load_trained", lambda *a, **k: pytest.fail("loaded the model"))
    code, _, err = run_command(merge.main, ["--adapter", str(adapter), "--output", str(tmp_path / "m"),
                                            "--device", device])
    assert code == 2 and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_shown_bounds_any_value():
    nested = [1]
    for _ in range(40):
        nested = [nested] * 9  # 9**40 leaves if walked
    assert len(shown(nested)) <= 63 and len(shown("x" * 10**6)) <= 63
    assert shown(10**6000) == "<an integer of about 6,000 digits>"
