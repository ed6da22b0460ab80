"""--fsdp (FSDP2): 2 gloo ranks on the CPU against one process over the same global batches, sharded
checkpoints (resume after kill -9, resume on fewer ranks), and what is sharded."""

import datetime
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from forked_ranks import run_forked_ranks
from lora_utils import tokens
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from train_utils import QUICK, ROOT, quick_config, run_quick
from transformers import AutoModelForCausalLM, LlamaConfig

import minilora
from minilora import stream_load
from minilora.data.batching import Batch
from minilora.errors import UserError
from minilora.inject import lora_layers, lora_parameters
from minilora.lock import LOCK_NAME, FolderLock
from minilora.quant import load_base
from minilora.training.fsdp import LoadSharder, ensure_process_group, gathered_adapter, shard_for_training
from minilora.training.job import build_model
from minilora.training.loss import CHUNK_ROWS, LossModule, loss_sum
from minilora.training.metrics import read_metrics
from minilora.training.recompute import decoder_layers


def torchrun_cmd(output, *extra, **overrides):
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
             for k, v in {**QUICK, **overrides}.items() if v is not False]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "train.py"), *flags, f"--output={output}", "--fsdp", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(output, *extra, **overrides):
    done = subprocess.run(torchrun_cmd(output, *extra, **overrides), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(output):
    return [m["loss"] for m in read_metrics(output / "metrics.jsonl") if m["kind"] == "train"]


def adapter(output):
    return load_file(output / "adapter_model.safetensors")


def assert_close_adapters(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=tol)


# A full-precision base (sharded by FSDP like the LoRA weights), DoRA (a 1-D magnitude per layer
# besides A and B) and full recompute (each layer's forward runs again in backward, its shards gathered
# again); dropout off so one process draws the same (no) masks as two.
RUN = dict(quant="none", dora=True, recompute="full", dropout=0.0, batch_size=2, max_steps=3, save_every=2,
           eval_every=0)


@pytest.mark.slow
def test_two_fsdp_ranks_match_one_process_and_resume_on_one_rank(tmp_path):
    """2 ranks x --grad-accum 2 == 1 process x --grad-accum 4: the same padding-free rows per step; each
    step's loss (normalised by the global target count) to fp32 summation order, and the saved adapter."""
    assert run_quick(tmp_path / "single", grad_accum=4, **RUN) == 0
    done = torchrun(tmp_path / "fsdp", grad_accum=2, **RUN)
    single, fsdp = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(fsdp) == RUN["max_steps"]
    assert fsdp == pytest.approx(single, rel=1e-5)
    assert_close_adapters(adapter(tmp_path / "fsdp"), adapter(tmp_path / "single"))
    assert json.loads((tmp_path / "fsdp" / "adapter_config.json").read_text())["use_dora"] is True
    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert (run["fsdp"], run["world_size"]) == (True, 2)
    assert done.stdout.count("held-out perplexity") == 1  # only rank 0 reports

    # PEFT loads the gathered adapter unchanged and computes what minilora computes with it.
    ours = minilora.load_base(QUICK["model"], quant="none")
    minilora.load_adapter(ours, tmp_path / "fsdp")
    x = tokens(vocab=256)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(minilora.load_base(QUICK["model"], quant="none"), str(tmp_path / "fsdp"))
        peft_logits, our_logits = theirs.eval()(x).logits, ours.eval()(x).logits
        with theirs.disable_adapter():
            base_logits = theirs(x).logits
    assert (peft_logits - our_logits).norm() / our_logits.norm() < 1e-4
    assert (base_logits - our_logits).norm() / our_logits.norm() > 1e-3  # the adapter changes the logits

    # The checkpoint: one shard file per rank, holding LoRA weights and AdamW state only (no base weight).
    step2 = tmp_path / "fsdp" / "checkpoints" / "step-2"
    assert json.loads((step2 / "manifest.json").read_text())["format"] == "fsdp-sharded"
    shards = sorted((step2 / "sharded").iterdir())
    assert len(shards) == 2
    keys = set()
    for path in shards:
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    kinds = {k.rsplit(".", 1)[1] for k in keys}
    assert kinds == {"lora_A", "lora_B", "lora_magnitude_vector", "step", "exp_avg", "exp_avg_sq"}
    assert all(k.startswith(("lora.", "adamw.")) for k in keys)

    # The 2-rank checkpoint at step 2 resumed on one rank: the global batch needs --grad-accum doubled.
    one = tmp_path / "one"
    shutil.copytree(tmp_path / "fsdp", one)
    shutil.rmtree(one / "checkpoints" / "step-3")
    (one / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="give --grad-accum 4"):
        run_quick(one, grad_accum=2, fsdp=True, resume=True, **RUN)
    with pytest.raises(UserError, match="written with --fsdp; resume it with --fsdp"):
        run_quick(one, grad_accum=4, resume=True, **RUN)
    assert run_quick(one, grad_accum=4, fsdp=True, resume=True, **RUN) == 0
    assert losses(one) == pytest.approx(losses(tmp_path / "fsdp"), rel=1e-5)
    assert_close_adapters(adapter(one), adapter(tmp_path / "fsdp"))


@pytest.mark.slow
def test_fsdp_resume_after_kill_9_is_identical_to_the_uninterrupted_run(tmp_path):
    """4-bit base (sharded as packed codes + statistics), dropout on (each rank's RNG state saved and restored)."""
    run = dict(batch_size=2, grad_accum=2, max_steps=4, save_every=2, eval_every=0)
    torchrun(tmp_path / "a", **run)
    out = tmp_path / "b"
    proc = subprocess.Popen(torchrun_cmd(out, **run), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-2" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists()
    done = torchrun(out, "--resume", **run)
    assert "continuing from" in done.stdout
    a, b = adapter(tmp_path / "a"), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_fsdp_shards_lora_and_the_base_on_one_rank(tmp_path, quant):
    """One rank (a group of one): which parameters FSDP manages, and the gathered adapter. The embeddings and
    the decoder layers are sharded by the loader, each before the next one is read; the root takes the rest."""
    cfg = quick_config(tmp_path, quant=quant, recompute="none", fsdp=True)
    own = ensure_process_group()
    try:
        # The loader's meta model, kept to look at from the callback: at each layer's sharding, are the embeddings
        # and the earlier layers all sharded and the later ones all unread (meta)?
        built, seen, skeleton = [], [], stream_load.skeleton
        sharder = LoadSharder(torch.device("cpu"), "fp32", offload=False)

        def watch(index, layer):
            layers = decoder_layers(built[0])
            seen.append((all(isinstance(m, FSDPModule) for m in [built[0].get_input_embeddings(), *layers[:index]]),
                         all(p.is_meta for m in layers[index + 1:] for p in m.parameters())))
            sharder.on_layer(index, layer)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stream_load, "skeleton", lambda *args: built.append(skeleton(*args)) or built[-1])
            load_base(cfg.model, quant=quant, compute_dtype=torch.float32, device="cpu", lora=dict(r=cfg.r),
                      on_layer=watch, on_embeddings=sharder.on_embeddings)
        assert seen == [(True, True)] * len(decoder_layers(built[0])) and len(seen) > 1

        model, _ = build_model(cfg, "fp32", torch.device("cpu"))
        # sharded while loading: the decoder layers and the embeddings (not tied to the head in this model)
        assert all(isinstance(m, FSDPModule) for m in [*decoder_layers(model), model.get_input_embeddings()])
        assert not isinstance(model.get_output_embeddings(), FSDPModule)  # the head: in the root, sharded next
        before = {k: v.full_tensor().clone() for k, v in model.state_dict().items() if "lora_" in k}
        root = shard_for_training(LossModule(model, [], torch.device("cpu"), sharded=True), model,
                                  torch.device("cpu"), "fp32", offload=False)
        assert isinstance(model.get_output_embeddings().weight, DTensor) and isinstance(root, FSDPModule)
        layer = next(iter(lora_layers(model).values()))
        assert isinstance(layer.lora_A, DTensor) and isinstance(layer.lora_B, DTensor)
        # One rank: the base is sharded (over one) too, a 4-bit weight as fsdp_nf4's shard of codes + statistics.
        assert isinstance(layer.base_layer.weight, DTensor)
        assert (type(layer.base_layer.weight.to_local()).__name__ == "NF4Shard") == (quant == "nf4")
        with gathered_adapter(model):
            assert not isinstance(layer.lora_A, DTensor)
            gathered = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert isinstance(layer.lora_A, DTensor)  # the sharded parameters are back
        assert gathered.keys() == before.keys() and all(torch.equal(gathered[k], before[k]) for k in before)
    finally:
        if own:
            dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_non_finite_steps_roll_back_to_a_sharded_checkpoint_that_resumes(tmp_path, monkeypatch):
    """One rank under --fsdp: NaN losses at steps 3-5 stop the run with the (sharded) state of step 1, the
    snapshot and rollback going through the sharded weights and AdamW state; a resume runs to the end."""
    forward, calls = LossModule.forward, itertools.count()

    def faulty(self, batch):  # the training forwards of steps 3-5 (evaluation runs through it too under --fsdp)
        if not torch.is_grad_enabled():
            return forward(self, batch)
        return forward(self, batch) * (float("nan") if next(calls) // QUICK["grad_accum"] + 1 in (3, 4, 5) else 1.0)

    monkeypatch.setattr(LossModule, "forward", faulty)
    out = tmp_path / "out"
    run = dict(fsdp=True, max_bad_steps=3, max_steps=6, eval_every=0)
    assert run_quick(out, **run) == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert all(torch.isfinite(t).all() for t in adapter(out / "checkpoints" / "step-1").values())
    monkeypatch.setattr(LossModule, "forward", forward)
    assert run_quick(out, resume=True, **{**run, "lr": QUICK["lr"] / 4}) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_fsdp_flags_that_cannot_work_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="add --fsdp"):
        quick_config(tmp_path, fsdp_offload=True)
    with pytest.raises(UserError, match="--optim adamw8bit with --fsdp"):
        quick_config(tmp_path, fsdp=True, optim="adamw8bit")


def test_a_waiting_folder_lock_takes_turns_instead_of_refusing(tmp_path):
    """Data preparations into one cache folder (a shared file system across hosts) take turns."""
    path = tmp_path / LOCK_NAME
    entered, leave = threading.Event(), threading.Event()

    def second():
        with FolderLock(path, "data cache", wait=True):
            entered.set()
            leave.wait(60)

    with FolderLock(path, "data cache"):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not entered.wait(0.3)  # held: the second one waits
        with pytest.raises(UserError, match="in use by another run"):  # a non-waiting lock still refuses
            FolderLock(path, "data cache").__enter__()
    assert entered.wait(60)  # released: the second one goes on
    leave.set()
    waiter.join()


def _one_row(length: int, seed: int, vocab: int) -> Batch:
    """One unpadded row of random tokens, every next token a target."""
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))  # (1, T)
    return Batch(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids),
                 position_ids=torch.arange(length)[None], n_target_tokens=length - 1, n_tokens=length, lines=((0,),),
                 row_tokens=(length,))


def _unequal_chunks_rank(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        cpu, lora = torch.device("cpu"), dict(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
        sharder = LoadSharder(cpu, "fp32", offload=False)
        reference = load_base(folder, device=cpu, lora=lora)
        model = load_base(folder, device=cpu, lora=lora, on_layer=sharder.on_layer,
                          on_embeddings=sharder.on_embeddings)
        torch.manual_seed(1)  # B random, as after some training, so every LoRA factor gets a gradient
        for a, b in zip(lora_parameters(reference), lora_parameters(model), strict=True):
            with torch.no_grad():  # the model's layers are sharded already (by the loader): b is a DTensor
                a.copy_(torch.randn_like(a) * 0.05)
                b.copy_(distribute_tensor(a.detach(), b.device_mesh, b.placements))
        root = shard_for_training(LossModule(model, [], cpu, sharded=True), model, cpu, "fp32", offload=False)
        assert isinstance(model.get_input_embeddings(), FSDPModule)

        # Rank 0's row has CHUNK_ROWS + 50 targets (the head runs twice), rank 1's 39 (once).
        vocab = model.config.vocab_size
        rows = [_one_row(CHUNK_ROWS + 51, 0, vocab), _one_row(40, 1, vocab)]
        n_targets = sum(b.n_target_tokens for b in rows)
        gathers, gather = [], dist.all_gather_single  # FSDP2's all-gather (one process group call per group)
        dist.all_gather_single = lambda *args, **kw: gathers.append(1) or gather(*args, **kw)
        mine = root(rows[rank])
        (mine * world / n_targets).backward()  # FSDP averages gradients over ranks (training/loop.py)
        dist.all_gather_single = gather
        # The same on both ranks: the root once (head included, however many chunks), the embeddings once (frozen:
        # not again for backward), each decoder layer twice (forward, then backward: resharded in between).
        assert len(gathers) == 2 + 2 * len(decoder_layers(model))
        want = sum(loss_sum(reference, b) for b in rows)
        (want / n_targets).backward()

        total = mine.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, want.detach(), rtol=1e-5, atol=0.0)
        ours = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert len(ours) == 3 * 2 * 2  # A and B of 3 targets in 2 layers
        for name, p in ((n, p) for n, p in reference.named_parameters() if p.requires_grad):
            torch.testing.assert_close(ours[name].grad.full_tensor(), p.grad, rtol=1e-4, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_running_the_head_a_different_number_of_times_stay_paired(tmp_path):
    """The chunked loss calls the head once per CHUNK_ROWS target rows, so ranks with more targets call it more
    often. Every FSDP group must run the same number of times on every rank (its all-gathers pair up across
    ranks): the embeddings are a group of their own, run once per forward; the head stays in the root, gathered
    once. A rank with 2 chunks beside one with 1: the loss and LoRA gradients equal one process's."""
    config = LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CHUNK_ROWS + 64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    run_forked_ranks(_unequal_chunks_rank, 2, str(tmp_path))
