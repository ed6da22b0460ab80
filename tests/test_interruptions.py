"""Interruptions: signals (in a real process and in every phase of the job), kill -9, damaged
checkpoints, a torn metrics line; each resume ends with the uninterrupted run's adapter."""

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_utils import DEMO, ROOT, argv_for, run_quick

import minilora.training.loop
from minilora.errors import UserError
from minilora.training.cli import run
from minilora.training.metrics import read_metrics, truncate_metrics

# --- interruptions (real subprocesses) -------------------------------------------------------------

def start(output, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "train.py"), *argv_for(output, DEMO, *extra)]  # a later flag wins
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("timed out")


def train_steps_logged(output):
    return sum(m["kind"] == "train" for m in read_metrics(output / "metrics.jsonl"))


def adapter_tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def same_adapter(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# 24 steps with a checkpoint every 3, on the small model (a step costs a fifth of builtin:tiny-phi3's).
RUN = dict(max_steps=24, save_every=3, eval_every=0)


def run_flags(model):
    return [f"--model={model}", *(f"--{k.replace('_', '-')}={v}" for k, v in RUN.items())]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_chat_model):
    """The output folder of the uninterrupted run, which each test's resumed run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run_quick(out, model=small_chat_model, **RUN) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_with_checkpoint_and_resume_finishes_identically(sig, code, tmp_path, uninterrupted,
                                                                              small_chat_model):
    out = tmp_path / "out"
    proc = start(out, *run_flags(small_chat_model))
    wait_for(lambda: train_steps_logged(out) >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    stopped_at = train_steps_logged(out)
    assert stopped_at < 24 and (out / "checkpoints" / f"step-{stopped_at}").is_dir()
    assert (out / "adapter_model.safetensors").is_file()
    assert run_quick(out, model=small_chat_model, resume=True, **RUN) == 0
    assert same_adapter(adapter_tensors(out), adapter_tensors(uninterrupted))


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_adapter(tmp_path, uninterrupted, small_chat_model, capsys):
    out = tmp_path / "out"
    proc = start(out, *run_flags(small_chat_model))
    wait_for(lambda: (out / "checkpoints" / "step-3").is_dir(), proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert run_quick(out, model=small_chat_model, resume=True, **RUN) == 0
    assert "resume: continuing from" in capsys.readouterr().out
    assert same_adapter(adapter_tensors(out), adapter_tensors(uninterrupted))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_skipped_and_reported(tmp_path, uninterrupted, small_chat_model, capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)  # a finished run's folder, as this run would write it
    state = out / "checkpoints" / "step-24" / "training_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated mid-write
    (out / "checkpoints" / ".step-27.abc.tmp").mkdir()  # an unfinished checkpoint folder
    assert run_quick(out, model=small_chat_model, resume=True, **RUN) == 0
    printed = capsys.readouterr().out
    assert "step-24: skipped, training_state.safetensors does not match its checksum" in printed
    assert "continuing from" in printed and "step-21" in printed
    assert same_adapter(adapter_tensors(out), adapter_tensors(uninterrupted))


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_dropped_and_the_resume_matches(tmp_path, uninterrupted, small_chat_model):
    """A crash during an append leaves half a line; the resume neither chokes on it nor keeps it."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)  # a finished run's folder, as this run would write it
    shutil.rmtree(out / "checkpoints" / "step-24")  # the crash came before checkpoint 24 ...
    (out / "adapter_model.safetensors").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 24, "lo')  # ... in the middle of an append
    assert run_quick(out, model=small_chat_model, resume=True, **RUN) == 0
    assert same_adapter(adapter_tensors(out), adapter_tensors(uninterrupted))
    steps = [m["step"] for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "train"]
    assert steps == list(range(1, 25))
    assert (out / "metrics.jsonl").read_text().endswith("}\n")


@pytest.mark.parametrize("tail", ['{"kind": "train", "st', '{"kind": "train", "st\n', "\x00" * 40])
def test_metrics_reader_drops_a_torn_last_line_and_reports_damage_before_it(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n' + tail)
    assert read_metrics(path) == [{"kind": "train", "step": 1}]
    truncate_metrics(path, 1)
    assert path.read_text() == '{"kind": "train", "step": 1}\n'
    path.write_text('{"kind": "train", "st\n{"kind": "train", "step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:1: not a JSON line"):
        read_metrics(path)


def signal_during_evaluation(monkeypatch, call: int, sig=signal.SIGTERM):
    """Deliver `sig` to this process while the `call`-th evaluation runs (1: before training)."""
    evaluate, calls = minilora.training.loop.evaluate, itertools.count(1)

    def signalled(*args, **kwargs):
        if next(calls) == call:
            os.kill(os.getpid(), sig)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(minilora.training.loop, "evaluate", signalled)


def test_sigterm_during_the_first_evaluation_stops_cleanly_before_training(tmp_path, monkeypatch, capsys):
    signal_during_evaluation(monkeypatch, call=1)
    out = tmp_path / "out"
    assert run(argv_for(out, DEMO, "--eval-every=0")) == 143
    err = capsys.readouterr().err
    assert "SIGTERM: stopped before training step 1; run the same command plus --overwrite" in err
    assert "Traceback" not in err and not (out / "checkpoints").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the job's handlers are gone again


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_still_writes_every_output(tmp_path, monkeypatch, capsys):
    signal_during_evaluation(monkeypatch, call=2)
    out = tmp_path / "out"
    assert run(argv_for(out, DEMO, "--eval-every=0", "--max-steps=2")) == 0
    assert "SIGTERM came after the last step: all 2 steps are done" in capsys.readouterr().err
    for name in ("adapter_model.safetensors", "eval.json", "README.md", "loss.png"):
        assert (out / name).is_file(), name
