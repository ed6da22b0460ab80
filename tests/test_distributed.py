"""Data parallel training: torchrun with 2 gloo ranks on the CPU against one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_utils import QUICK, ROOT, run_quick

from minilora.training.metrics import read_metrics

pytestmark = pytest.mark.slow  # torchrun: two processes, each loading the model

STEPS = dict(max_steps=3, dropout=0.0, eval_every=0, save_every=0)


def torchrun(output, *extra, **overrides):
    """train.py on 2 gloo ranks (CPU), QUICK settings with `overrides`; returns the finished process."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**QUICK, **overrides}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *flags, f"--output={output}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_gloo_ranks_match_one_process_over_the_same_global_batches(tmp_path):
    """2 ranks x batch 2 == 1 process x batch 2 x twice the accumulation: the same padding-free rows
    (one per rank and micro-batch) and examples per step, gradients all-reduced once."""
    assert run_quick(tmp_path / "single", batch_size=2, grad_accum=4, **STEPS) == 0
    done = torchrun(tmp_path / "ddp", **STEPS, batch_size=2)
    single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    # The accumulated gradients decide each step: their norm and the loss, logged before AdamW, must
    # agree to fp32 summation-order rounding.
    steps = lambda run: [(m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / run / "metrics.jsonl")
                         if m["kind"] == "train"]
    assert len(steps("ddp")) == STEPS["max_steps"]
    for (loss_d, norm_d), (loss_s, norm_s) in zip(steps("ddp"), steps("single"), strict=True):
        assert loss_d == pytest.approx(loss_s, rel=1e-5) and norm_d == pytest.approx(norm_s, rel=1e-5)
    # AdamW divides by sqrt(v): an entry whose gradient is at rounding level may move by a fraction of
    # lr (1e-3 here) differently, depending on the CPU's summation order; 1e-4 allows that, not more.
    assert single.keys() == ddp.keys()
    for key in single:
        # Padding-free: a rank's row is padded to the other rank's (a separate, ignored sequence), so the
        # GEMM shapes differ from the single process's and rounding differs a little more.
        torch.testing.assert_close(ddp[key], single[key], atol=1e-4, rtol=1e-4)
    assert not torch.equal(single[key], torch.zeros_like(single[key]))
    ev_single = json.loads((tmp_path / "single" / "eval.json").read_text())
    ev_ddp = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    assert ev_ddp["after"]["tokens"] == ev_single["after"]["tokens"]  # eval reduced over both ranks
    assert ev_ddp["after"]["loss"] == pytest.approx(ev_single["after"]["loss"], rel=1e-5)
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    assert done.stdout.count("held-out perplexity") == 1  # only rank 0 reports


def test_two_rank_resume_is_identical_to_an_uninterrupted_two_rank_run(tmp_path):
    """Dropout on: each rank's RNG state is checkpointed and restored to that rank."""
    run = dict(batch_size=2, max_steps=4, save_every=2, eval_every=0)
    torchrun(tmp_path / "a", **run)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # run b: a's folder rolled back to its step-2 checkpoint
    (tmp_path / "b" / "adapter_model.safetensors").unlink()
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    done = torchrun(tmp_path / "b", "--resume", **run)
    assert "continuing from" in done.stdout and "step-2" in done.stdout
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
