"""Bad input, resume rules, the output lock and numerical faults: a clear message, the right exit code,
nothing lost."""

import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_utils import DEMO, QUICK, ROOT, argv_for, run_quick

import minilora.training.loss
from minilora.errors import UserError
from minilora.lock import LOCK_NAME
from minilora.training.cli import run
from minilora.training.loss import LossModule
from minilora.training.metrics import read_metrics
from minilora.training.schedule import lr_at

GOOD = json.dumps({"instruction": "Say hi", "output": "hi"})


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_output(tmp_path):
    """An --output folder that already holds something (which must survive every failed run)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    return out


BAD_FILES = {
    "empty": (b"", None, "the file is empty"),
    "not_utf8": (GOOD.encode() + b"\n" + b'{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    "not_json": (f"{GOOD}\n{GOOD}\n{{oops\n".encode(), 3, "expected JSON"),
    "not_object": (f"{GOOD}\n[1, 2]\n".encode(), 2, "expected a JSON object, got a list"),
    "unknown_fields": (f"{GOOD}\n{json.dumps({'question': 'q'})}\n".encode(), 2, "no known fields"),
    "wrong_type": (json.dumps({"instruction": "x", "output": 5}).encode(), 1,
                   "field 'output' must be a string, got int"),
    "messages_not_list": (json.dumps({"messages": "hi"}).encode(), 1, "field 'messages' must be a list"),
    "bad_role": (json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), 1,
                 'role "bot" is not one of'),
    "mixed_formats": (f"{GOOD}\n{json.dumps({'text': 'hello'})}\n".encode(), 2, "but the file started as alpaca"),
    "only_blank": (b"\n\n  \n", None, "only blank lines"),
    "all_too_long": (json.dumps({"instruction": "x" * 400, "output": "y"}).encode(), None,
                     "no example has a response token within --seq-len 128"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_is_one_line_exit_2_and_output_untouched(case, tmp_path, existing_output, capsys):
    content, line, fragment = BAD_FILES[case]
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    before = snapshot(existing_output)
    assert run(argv_for(existing_output, data, "--overwrite")) == 2
    err = capsys.readouterr().err.strip()
    where = f"{data}:{line}: " if line else f"{data}: "
    assert err.startswith(f"error: {where}") and fragment in err, err
    assert "\n" not in err and "Traceback" not in err
    assert snapshot(existing_output) == before


def test_missing_data_file(tmp_path, existing_output, capsys):
    assert run(argv_for(existing_output, tmp_path / "nope.jsonl")) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file (--data)"


@pytest.mark.parametrize("flags,fragment", [
    (["--lr=-1"], "--lr -1.0: the learning rate must be positive"),
    (["--r=0"], "--r 0: the LoRA rank must be at least 1"),
    (["--eval-fraction=1.5"], "--eval-fraction 1.5: the held-out share must be in [0, 1)"),
    (["--dropout=1"], "--dropout 1.0: must be in [0, 1)"),
    (["--targets", "qkv_proj", "nonexistent_proj"], "--targets nonexistent_proj: no such module in Phi3ForCausalLM"),
    (["--targets", "qkv_proj", "self_attn.o_prj"], "--targets self_attn.o_prj: no such module in Phi3ForCausalLM"),
    (["--targets", "qkv_proj", "query_key_value"], "--targets query_key_value: no such module"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--eval-file", str(DEMO), "--eval-fraction=0.1"], "--eval-file and --eval-fraction"),
    (["--precision=fp16"], "--precision fp16 needs a CUDA GPU"),
    (["--kernels=triton"], "--kernels triton needs a CUDA GPU"),
    (["--epochs=inf"], "--epochs inf: must be a finite number"),
    (["--weight-decay=nan"], "--weight-decay nan: must be a finite number"),
    (["--max-grad-norm=nan"], "--max-grad-norm nan: must be a finite number"),
    (["--seed=99999999999999"], "--seed 99999999999999: must be in [0, 2**32)"),
])
def test_bad_flags_are_caught_before_the_model_loads(flags, fragment, tmp_path, existing_output, capsys,
                                                      monkeypatch):
    monkeypatch.setattr("minilora.dispatch.kernels_interpreted", lambda: False)  # no Triton interpreter here
    loaded = []
    monkeypatch.setattr("minilora.training.job.load_base", lambda *a, **k: loaded.append(1))
    assert run(argv_for(existing_output, DEMO, *flags)) == 2
    assert fragment in capsys.readouterr().err
    assert not loaded


@pytest.mark.slow
def test_output_holding_another_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_quick(out, max_steps=2) == 0
    before = snapshot(out)
    assert run(argv_for(out, DEMO)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.slow
def test_resume_with_changed_flags_lists_the_differences(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_quick(out, max_steps=3) == 0
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(DEMO.read_text().splitlines()[:300]) + "\n")
    assert run(argv_for(out, other, "--resume", "--r=16")) == 2
    err = capsys.readouterr().err
    assert "differs from the run" in err and "r: 8 -> 16" in err and "data_sha256" in err


@pytest.mark.slow
def test_resume_may_change_how_layers_are_recomputed(tmp_path):
    """--recompute and --recompute-every change memory and speed, not the numbers: a resume may change them."""
    out = tmp_path / "out"
    assert run_quick(out, max_steps=2, eval_every=0) == 0
    assert run_quick(out, max_steps=3, eval_every=0, resume=True, recompute="full", recompute_every=2) == 0
    assert run_quick(out, max_steps=4, eval_every=0, resume=True, recompute="none") == 0


HOLD_LOCK = """
import sys, time
from minilora.lock import FolderLock
FolderLock(sys.argv[1], "--output").__enter__()
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_output_is_locked_for_the_run_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert run(argv_for(out, DEMO)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --output {out} is in use by another run (pid {holder.pid} on "), err
    assert "\n" not in err and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    holder.kill()  # as kill -9 or a power cut would: the lock file stays behind, its flock does not
    holder.communicate()
    assert (out / LOCK_NAME).is_file()
    assert run_quick(out, max_steps=1, eval_every=0) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_a_failed_run_leaves_no_lock_and_no_folder_it_created(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint"):
        run_quick(tmp_path / "new", resume=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_resume_may_extend_the_run_and_change_the_learning_rate_with_a_notice(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_quick(out, max_steps=4, save_every=2, eval_every=0) == 0
    capsys.readouterr()
    assert run_quick(out, max_steps=6, save_every=2, eval_every=0, lr=5e-4, resume=True) == 0
    printed = capsys.readouterr().out
    assert "resume: --lr 0.001 -> 0.0005 for the rest of the run" in printed
    assert "resume: --max-steps 4 -> 6 for the rest of the run" in printed
    steps = [m for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[4]["lr"] == pytest.approx(lr_at(4, 5e-4, 2, 6, QUICK.get("min_lr_ratio", 0.1)))
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["resumes"] == [{"step": 4, "changed": {"lr": [0.001, 0.0005], "max_steps": [4, 6]}}]
    assert "- Resumed at step 4, changing lr 0.001 -> 0.0005, max_steps 4 -> 6" in (out / "README.md").read_text()


@pytest.mark.slow
def test_skip_bad_lines_continues_and_reports(tmp_path, capsys):
    data = tmp_path / "some_bad.jsonl"
    lines = DEMO.read_text().splitlines()[:80]
    lines[4], lines[9] = "{oops", "[1]"
    data.write_text("\n".join(lines) + "\n")
    assert run(argv_for(tmp_path / "out", data, "--skip-bad-lines", "--max-steps=2")) == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad lines (--skip-bad-lines): 5, 10" in out
    assert json.loads((tmp_path / "out" / "run.json").read_text())["data"]["skipped_lines"] == [5, 10]


# --- numerical faults ------------------------------------------------------------------------------

def nan_loss_on_steps(monkeypatch, steps: set[int], grad_accum: int = QUICK["grad_accum"]) -> None:
    """The training loss of these optimizer steps (numbered from 1, as in metrics.jsonl) becomes NaN."""
    forward, calls = LossModule.forward, itertools.count()

    def faulty(self, batch):
        step = next(calls) // grad_accum + 1
        return forward(self, batch) * (float("nan") if step in steps else 1.0)

    monkeypatch.setattr(LossModule, "forward", faulty)


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    nan_loss_on_steps(monkeypatch, {2})
    assert run_quick(tmp_path / "out", max_steps=4) == 0
    steps = [m for m in read_metrics(tmp_path / "out" / "metrics.jsonl") if m["kind"] == "train"]
    assert steps[1]["skipped"] == "non-finite loss" and steps[1]["loss"] is None
    assert all("skipped" not in m for i, m in enumerate(steps) if i != 1)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.slow
def test_consecutive_nan_steps_stop_with_a_checkpoint_and_no_nan_weights(tmp_path, monkeypatch, capsys):
    """Steps 3-5 are NaN: the update of step 2 led to them, so the stop checkpoints the state before it
    (step 1), drops the newer checkpoints (step 3 holds step 2's update), and a resume with the lower
    learning rate the message gives runs to the end."""
    nan_loss_on_steps(monkeypatch, {3, 4, 5})
    code = run(argv_for(tmp_path / "out", DEMO, "--max-bad-steps=3", "--max-steps=8"))
    assert code == 1
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row had a non-finite loss" in err
    ckpt = tmp_path / "out" / "checkpoints" / "step-1"
    assert [p.name for p in ckpt.parent.iterdir()] == ["step-1"] and str(ckpt) in err
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    command = re.search(r"the same command plus (--resume --lr \S+);", err).group(1).split()
    assert run(argv_for(tmp_path / "out", DEMO, "--max-bad-steps=3", "--max-steps=8", *command)) == 0
    steps = [m["step"] for m in read_metrics(tmp_path / "out" / "metrics.jsonl") if m["kind"] == "train"]
    assert steps == list(range(1, 9))


def test_out_of_memory_reports_the_step_and_the_flags_that_help(tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(minilora.training.loss, "loss_sum", oom)
    assert run(argv_for(tmp_path / "out", DEMO, "--eval-fraction=0")) == 3
    err = capsys.readouterr().err
    assert "out of GPU memory at step 1 (batch 4, --seq-len 128)" in err
    assert "--batch-size 2 --grad-accum 4" in err and "Traceback" not in err


@pytest.mark.slow
def test_outputs_get_the_permissions_of_the_umask(tmp_path):
    """A serving process running as another user must be able to read the adapter (umask 022)."""
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert run_quick(out, max_steps=1, eval_every=0, save_every=1) == 0
    finally:
        os.umask(old)
    for path in [out, *out.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_a_folder_holding_only_the_users_readme_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    assert run(argv_for(out, DEMO)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a README.md that is not from a run" in err and "already holds a run" not in err
    assert (out / "README.md").read_text() == "my notes"


@pytest.mark.parametrize("make,fragment", [
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "out", "cannot write there (Not a directory)"),
    (lambda tmp: (tmp / "out").write_text("x") and tmp / "out", "exists and is not a folder"),
])
def test_an_output_that_cannot_be_a_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, make, fragment):
    out = make(tmp_path)
    monkeypatch.setattr("minilora.training.job.load_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    assert run(argv_for(out, DEMO)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --output {out}: {fragment}", err
