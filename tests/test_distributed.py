"""Data parallel training (torchrun, gloo on CPU) and the memory levers."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_utils import DEMO, QUICK, ROOT, run_quick

import minilora
from minilora.builtin import build_tokenizer
from minilora.data.batching import make_batches
from minilora.data.dataset import load_dataset
from minilora.training.loss import loss_sum
from minilora.training.offload import OffloadSaved
from minilora.training.optim import make_optimizer
from minilora.training.recompute import Recomputed, enable_recompute

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
    assert single.keys() == ddp.keys()
    for key in single:
        # A rank's row is padded to the other rank's (a separate, ignored sequence): same sums, other
        # GEMM shapes, so rounding differs slightly and AdamW amplifies it in near-zero gradients.
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)
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
    torchrun(tmp_path / "b", **run)
    (tmp_path / "b" / "adapter_model.safetensors").unlink()
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    done = torchrun(tmp_path / "b", "--resume", **run)
    assert "continuing from" in done.stdout and "step-2" in done.stdout
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def demo_batch(n=4):
    tokenizer = build_tokenizer()
    return make_batches(load_dataset(DEMO, tokenizer, 128).examples[:n], n, 0, 0, tokenizer.pad_token_id)[0]


def lora_grads(batch, every=None, chunk_rows=2048, offload=None):
    torch.manual_seed(0)
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model, dropout=0.05)
    with torch.no_grad():
        for p in minilora.lora_parameters(model):
            p.normal_(0, 0.05)
    wrapped = enable_recompute(model, every=every, offload=offload) if every else 0
    model.train()
    torch.manual_seed(1)
    loss = loss_sum(model, batch, chunk_rows=chunk_rows)
    loss.backward()
    return wrapped, [loss.detach()] + [p.grad for p in minilora.lora_parameters(model)]


@pytest.mark.parametrize("every,wrapped", [(1, 4), (2, 2)])  # all 4 layers; layers 0 and 2
def test_recompute_gives_the_same_loss_and_gradients(every, wrapped):
    """Checkpointing replays the RNG state on recompute: same dropout masks, same numbers."""
    batch = demo_batch()
    _, plain = lora_grads(batch)
    n, recomputed = lora_grads(batch, every=every)
    assert n == wrapped
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_offloaded_checkpoint_inputs_give_the_same_gradients():
    batch = demo_batch()
    _, plain = lora_grads(batch)

    class CountingOffload(OffloadSaved):
        def __init__(self):
            self.packed = []
            super().__init__(devices=("cpu",), min_numel=1)  # CPU stands in for CUDA here

        def _pack(self, t):
            self.packed.append(tuple(t.shape))
            return super()._pack(t)

    offload = CountingOffload()
    _, offloaded = lora_grads(batch, every=1, offload=offload)
    assert offload.packed.count((4, batch.input_ids.shape[1], 256)) >= 4  # each layer's input went through
    for a, b in zip(plain, offloaded, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_adapter_names_never_show_the_recompute_wrapper():
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model)
    enable_recompute(model)
    assert isinstance(model.model.layers[0], Recomputed)
    assert next(iter(minilora.lora_layers(model))) == "model.layers.0.self_attn.o_proj"


def test_chunked_cross_entropy_equals_one_chunk():
    batch = demo_batch()
    _, whole = lora_grads(batch, chunk_rows=10**9)
    _, chunked = lora_grads(batch, chunk_rows=7)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_recompute_wrapper_is_transparent_in_eval():
    layer = torch.nn.Linear(4, 4)
    wrapped = Recomputed(layer).eval()
    x = torch.randn(2, 4)
    assert torch.equal(wrapped(x), layer(x))


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_tracks_adamw(name):
    """Same gradients, a few steps: 8-bit state moves the weights like fp32 AdamW (to ~1% of the step)."""
    torch.manual_seed(0)
    start = torch.randn(64, 256) * 0.02
    results = {}
    for opt_name in ("adamw", name):
        p = torch.nn.Parameter(start.clone())
        opt = make_optimizer(opt_name, [p], lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results[opt_name] = p.detach()
    moved = (results["adamw"] - start).abs().mean()
    assert moved > 1e-3  # the weights really moved (3 steps of lr 1e-3)
    assert (results[name] - results["adamw"]).abs().mean() < 0.02 * moved
