"""Foreseeable failures end as one line: exit 2 for bad input (a chat template that raises, a model folder
that cannot be a model, a number past Python's digit limit), exit 1 for the environment (a full disk or a
file size limit, naming the file and how much was written), with nothing already written lost."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from train_utils import DEMO, ROOT, argv_for

from minilora.atomic import write_error
from minilora.builtin import CHAT_TEMPLATE, build_tokenizer, resolve_builtin
from minilora.data.dataset import load_dataset
from minilora.errors import DataError
from minilora.training.cli import run

CHAT = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)]
SYSTEM = {"messages": [{"role": "system", "content": "be brief"}, *CHAT[0]["messages"]]}
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE)


def _chat_file(tmp_path, records):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("template,line,fragment", [
    (NO_SYSTEM, 3, "TemplateError: System role not supported"),
    ("{{ messages[0]['content'] | shout }}" + CHAT_TEMPLATE, 1, "No filter named 'shout'"),
    ("{{ messages[5]['content'] }}" + CHAT_TEMPLATE, 1, "UndefinedError"),
])
def test_a_chat_template_that_raises_is_the_line_that_made_it(tmp_path, template, line, fragment):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    data = _chat_file(tmp_path, [CHAT[0], CHAT[1], SYSTEM, CHAT[2]])
    with pytest.raises(DataError) as raised:
        load_dataset(data, tokenizer, 64, cache_dir=tmp_path / "cache")
    assert str(raised.value).startswith(f"{data}:{line}: the tokenizer's chat template fails on this example (")
    assert fragment in str(raised.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_skip_bad_lines_skips_the_conversations_a_template_refuses(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = NO_SYSTEM
    data = _chat_file(tmp_path, [CHAT[0], SYSTEM, CHAT[1], SYSTEM, CHAT[2]])
    ds = load_dataset(data, tokenizer, 64, skip_bad_lines=True)
    assert [line for line, _ in ds.skipped] == [2, 4] and len(ds.examples) == 3


def test_the_template_error_reaches_train_as_one_line_exit_2(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(resolve_builtin("tiny-phi3"), model)
    (model / "chat_template.jinja").write_text(NO_SYSTEM)
    data = _chat_file(tmp_path, [CHAT[0], SYSTEM])
    assert run(argv_for(tmp_path / "out", data, "--model", str(model))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}:2: the tokenizer's chat template fails") and "\n" not in err


@pytest.mark.parametrize("line", ['{"text": ' + "9" * 6000 + "}",
                                  '{"instruction": "x", "output": "y", "input": [' + "1" * 5000 + "]}"])
def test_a_number_past_pythons_digit_limit_is_a_bad_line(tmp_path, capsys, line):
    data = tmp_path / "digits.jsonl"
    data.write_text(DEMO.read_text().splitlines()[0] + "\n" + line + "\n")
    assert run(argv_for(tmp_path / "out", data)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}:2: expected JSON: Exceeds the limit") and len(err) < 400


def _model_with(tmp_path, change):
    model = tmp_path / "model"
    shutil.copytree(resolve_builtin("tiny-phi3"), model)
    change(model)
    return model


def _edit_config(**values):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(values)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


MODELS = {
    "truncated weights": (_truncate_weights, "cannot load it (SafetensorError"),
    "vocab below the pad id": (_edit_config(vocab_size=100), "its config does not make a model (AssertionError"),
    "7 attention heads": (_edit_config(num_attention_heads=7), "does not make a working model (RuntimeError"),
    "kv heads not dividing": (_edit_config(num_key_value_heads=3), "does not make a working model"),
    "hidden_size a string": (_edit_config(hidden_size="big"), "its config does not make a model"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), "its config does not make a model"),
    "truncated tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "trunc'),
                            "cannot load its tokenizer"),
    "vocab below the tokenizer": (_edit_config(vocab_size=200, pad_token_id=0), "the tokenizer gives ids up to 263"),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_a_model_folder_that_cannot_be_a_model_is_one_line_exit_2(tmp_path, capsys, case):
    change, fragment = MODELS[case]
    model = _model_with(tmp_path, change)
    out = tmp_path / "out"
    assert run(argv_for(out, DEMO, "--model", str(model), "--max-steps=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and fragment in err and "unexpected" not in err, err
    assert str(model) in err and len(err) < 500
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("change", [dict(num_attention_heads=7), dict(num_key_value_heads=3)])
def test_a_config_whose_sizes_disagree_is_refused_by_a_meta_forward(tmp_path, change):
    """Weights saved from such a config would load; the first batch would fail. The probe allocates nothing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from minilora.errors import UserError
    from minilora.training.job import probe_shapes

    def skeleton(folder, **values):
        model = _model_with(folder, _edit_config(**values))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))

    good, bad = skeleton(tmp_path / "good"), skeleton(tmp_path / "bad", **change)
    probe_shapes(good, "good")
    with pytest.raises(UserError, match="^base model bad: its config does not make a working model"):
        probe_shapes(bad, "bad")


def test_write_errors_of_libraries_become_oserrors_naming_the_file(tmp_path):
    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                        'left on device" })')
    err = write_error(rust, tmp_path / "checkpoints" / "step-3", tmp_path)
    assert err.errno == 28 and err.filename == str(tmp_path / "checkpoints" / "step-3")
    assert err.strerror.startswith("No space left on device") and "free there; it needs more than that" in err.strerror
    torch_msg = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")
    assert write_error(torch_msg, tmp_path / "x").errno in (5, 28)
    safetensors_msg = RuntimeError("Error while serializing: I/O error: File too large (os error 27)")
    assert write_error(safetensors_msg, tmp_path / "y").errno == 27
    assert write_error(ValueError("something else"), tmp_path / "x") is None


def _limited(limit_bytes: int):
    """In the child: a file size limit (the portable stand-in for a full disk) whose signal is ignored, so a
    write past it fails with EFBIG as a write to a full disk fails with ENOSPC."""
    def set_limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return set_limit


@pytest.mark.slow
def test_a_checkpoint_write_past_the_limit_is_one_line_exit_1_and_earlier_ones_stay(tmp_path):
    out = tmp_path / "out"
    assert run(argv_for(out, DEMO, "--max-steps=2", "--save-every=1", "--eval-every=0")) == 0
    sizes = [p.stat().st_size for p in (out / "checkpoints" / "step-2").iterdir()]
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    cmd = [sys.executable, str(ROOT / "train.py"),
           *argv_for(out, DEMO, "--max-steps=4", "--save-every=1", "--eval-every=0", "--resume")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          preexec_fn=_limited(max(sizes) - 1), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert last.startswith(f"error: {out / 'checkpoints' / 'step-3'}: File too large") and "written" in last, last
    assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in before} == before  # the checkpoints written before are intact
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_data_cache_write_past_the_limit_names_the_file(tmp_path):
    code = ("import sys; from pathlib import Path; from minilora.builtin import build_tokenizer; "
            "from minilora.data.dataset import load_dataset; from minilora.cli_runner import run_cli; "
            f"sys.exit(run_cli(lambda a: load_dataset(Path({str(DEMO)!r}), build_tokenizer(), 128, "
            f"cache_dir=Path({str(tmp_path / 'cache')!r})) and 0))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(4096))
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'cache'}/.tmp-") and ".bin: File too large" in last, last
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # nothing half-written is published
