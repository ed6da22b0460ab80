"""4-bit base weights sharded by FSDP2 (minilora/fsdp_nf4.py): bytes, statistics, outputs and training."""

import gc
import math
import weakref

import bitsandbytes as bnb
import pytest
import torch
from forked_ranks import run_forked_ranks
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from minilora.fsdp_nf4 import NF4Layout, ShardableParams4bit, base_bytes, make_4bit_shardable
from minilora.inject import count_parameters, lora_layers, set_kernel_mode
from minilora.quant import load_base, quantize_linear

# Sizes that do not divide into ranks x groups of 256 blocks of 64 weights: q/o_proj [256, 256] hold 4
# groups (3 ranks: the third holds padding only); k/v_proj [32, 256] half a group (every rank but the
# first holds padding); gate/up [1344, 256] and down [256, 1344] 21 groups (the last rank pads one).
# 3 ranks divide no layer's packed bytes evenly. All sizes multiples of 64 (bitsandbytes' CPU dequant).
CONFIG = dict(vocab_size=160, hidden_size=256, intermediate_size=1344, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=1, max_position_embeddings=64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=4, alpha=8, dropout=0.0, targets=TARGETS)


def bf16_nan_bytes(n: int) -> torch.Tensor:
    """n bytes (n even) whose every little-endian byte pair is a bf16 NaN, with varied payloads:
    exponent bits all ones (high byte 0x7F or 0xFF, low byte >= 0x80), mantissa bits not all zero."""
    pairs = torch.arange(n // 2)
    low = (0x80 | (1 + pairs % 127)).to(torch.uint8)
    high = torch.where(pairs % 2 == 0, 0x7F, 0xFF).to(torch.uint8)
    out = torch.stack([low, high], dim=1).reshape(-1)
    assert out.view(torch.bfloat16).isnan().all()
    return out


def quantized(n: int, k: int, double_quant: bool, seed: int = 0) -> bnb.nn.Linear4bit:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    return quantize_linear(linear, "nf4", double_quant, torch.float32, torch.device("cpu"))


def state_tensors(weight) -> dict[str, torch.Tensor]:
    qs = weight.quant_state
    out = {"data": weight.data, "absmax": qs.absmax, "code": qs.code}
    if qs.nested:
        out.update(absmax2=qs.state2.absmax, code2=qs.state2.code, offset=torch.as_tensor(qs.offset))
    return out


def gathered(shards) -> tuple[torch.Tensor, ...]:
    """What FSDP's all-gather hands fsdp_post_all_gather: each input's ranks concatenated along dim 0."""
    inputs = [shard.fsdp_pre_all_gather(None, None, None, None, None)[0] for shard in shards]
    return tuple(torch.cat(parts) for parts in zip(*inputs, strict=True))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(("n", "k", "world"), [(192, 192, 2), (64, 192, 2), (448, 192, 4), (64, 64, 8),
                                               (64, 64, 3), (32, 256, 3)])
def test_shards_hold_whole_groups_and_gather_to_the_same_bytes(n, k, world, double_quant):
    layer = quantized(n, k, double_quant)
    original = layer.weight
    nan = bf16_nan_bytes(256)
    original.data.view(-1)[:256] = nan  # codes are arbitrary nibbles: NaN-pattern bytes are a valid weight
    weight = ShardableParams4bit.wrap(original)
    layout = NF4Layout.of(weight)
    groups = math.ceil(n * k / 64 / (256 if double_quant else 1))
    g = math.ceil(groups / world)
    shards = torch.chunk(weight, world, dim=0)  # what fully_shard calls
    assert len(shards) == world
    for shard in shards:
        assert shard.shape == (math.ceil(n * k / 2 / world), 1)  # the same on every rank
        assert shard.packed.shape == (g, layout.group_bytes) and shard.absmax.shape == (g, layout.group_blocks)
        assert (shard.absmax2 is not None) == double_quant
    # FSDP's padding sequence (_init_sharded_param): new_zeros of the first chunk's size, narrow, copy in.
    padded = weight.new_zeros(shards[0].shape)
    padded.narrow(dim=0, start=0, length=shards[-1].shape[0]).copy_(shards[-1])
    assert all(torch.equal(a, b) for a, b in zip(padded.inner(), shards[-1].inner(), strict=True))
    assert type(weight.new_zeros((3, 5))) is torch.Tensor  # any other size: a plain tensor
    whole = gathered(shards)
    unsharded, inner = shards[0].fsdp_post_all_gather(whole, None, torch.uint8)
    assert isinstance(unsharded, bnb.nn.Params4bit) and unsharded.shape == original.shape
    assert unsharded.data.untyped_storage().data_ptr() == whole[0].untyped_storage().data_ptr()  # no copy
    assert torch.equal(unsharded.data.view(-1)[:256], nan)
    want, got = state_tensors(original), state_tensors(unsharded)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert unsharded.quant_state.shape == original.quant_state.shape
    assert torch.equal(bnb.functional.dequantize_4bit(unsharded.data, unsharded.quant_state),
                       bnb.functional.dequantize_4bit(original.data, original.quant_state))
    # FSDP's as_strided to the logical size, then nn.Parameter (which detaches), keep the quant state.
    as_param = nn.Parameter(torch.as_strided(unsharded, original.shape, (1, 1), 0), requires_grad=False)
    assert isinstance(as_param, ShardableParams4bit) and as_param.quant_state is unsharded.quant_state


def test_conversion_leaves_the_model_output_unchanged(tiny_llama_dir):
    model = load_base(tiny_llama_dir, device="cpu", lora=LORA)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    tensors = {name: state_tensors(m.weight) for name, m in model.named_modules()
               if isinstance(m, bnb.nn.Linear4bit)}
    assert make_4bit_shardable(model) == len(tensors) == 14
    assert make_4bit_shardable(model) == 0  # idempotent
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert isinstance(m.weight, ShardableParams4bit) and not m.weight.requires_grad
            assert all(a is b or a.data_ptr() == b.data_ptr()
                       for a, b in zip(tensors[name].values(), state_tensors(m.weight).values(), strict=True))
    assert torch.equal(model(input_ids=ids).logits, before)
    counted = base_bytes(model)
    assert counted.local == counted.whole  # not sharded: every byte is here


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow  # 2 or 3 processes, each loading two models
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_shards_the_4bit_base_and_matches_one_process(tiny_llama_dir, world):
    run_forked_ranks(_fsdp_rank, world, tiny_llama_dir)  # each rank runs one thread


def _lora_seeded(folder: str) -> nn.Module:
    """The tiny model, 4-bit with LoRA, B random (so both factors get gradients), NaN-pattern bytes in a base."""
    model = load_base(folder, device="cpu", lora=LORA)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn_like(p) * 0.05)
        model.model.layers[0].self_attn.q_proj.base_layer.weight.data.view(-1)[:4096] = bf16_nan_bytes(4096)
    return model


def _lora_named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def assert_same_logits_and_lora_grads(model: nn.Module, reference: nn.Module, ids: torch.Tensor,
                                      rtol: float = 0.0) -> None:
    """One forward and backward of both (loss: mean squared logit): bit-equal logits, and the sharded model's
    LoRA gradients (gathered) equal the reference's within `rtol` (0: bit for bit)."""
    got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.equal(got, want)
    got.square().mean().backward()
    want.square().mean().backward()
    ref_params = _lora_named(reference)
    for name, p in _lora_named(model).items():
        torch.testing.assert_close(p.grad.full_tensor(), ref_params[name].grad, rtol=rtol, atol=0.0, msg=name)


def _loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens (labels != -100), as training.loss does."""
    logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       reduction="sum", ignore_index=-100)


def _fsdp_rank(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        reference, model = _lora_seeded(folder), _lora_seeded(folder)
        originals = {name: state_tensors(m.weight) for name, m in reference.named_modules()
                     if isinstance(m, bnb.nn.Linear4bit)}
        layouts = {name: NF4Layout.of(m.weight) for name, m in reference.named_modules()
                   if isinstance(m, bnb.nn.Linear4bit)}
        make_4bit_shardable(model)
        whole = weakref.ref(model.model.layers[0].mlp.gate_proj.base_layer.weight)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gc.collect()
        assert whole() is None  # the whole weight is gone once sharded, not only uncounted

        # (a) each rank holds ceil(groups / world) groups of every base weight: codes and statistics.
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                assert isinstance(m.weight, DTensor) and not m.weight.requires_grad
                shard, layout = m.weight._local_tensor, layouts[name]
                g = math.ceil(layout.n_groups / world)
                assert shard.packed.numel() == g * 256 * 32 and shard.absmax.numel() == g * 256
                assert shard.absmax.dtype == torch.uint8 and shard.absmax2.numel() == g
                # whole groups: at most one group's worth more than an exact 1/world of the bytes
                assert shard.packed.numel() - layout.n_bytes / world < 256 * 32
        assert count_parameters(model) == count_parameters(reference)  # 4-bit weights at N*K, sharded or not
        counted = base_bytes(model)
        assert counted.whole == base_bytes(reference).whole
        # whole groups: the small layers cost every rank more than 1/world (see CONFIG)
        assert counted.whole / world < counted.local < (1 / world + 0.1) * counted.whole, counted

        # (c) unsharded, every weight is a Params4bit of the original bytes and statistics.
        for layer in model.model.layers:
            layer.unshard()
        for name, m in model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit) and name.startswith("model.layers."):
                assert isinstance(m.weight, bnb.nn.Params4bit)
                got = state_tensors(m.weight)
                for key, want in originals[name].items():
                    assert got[key].dtype == want.dtype and torch.equal(got[key], want), (name, key)
        nan_region = model.model.layers[0].self_attn.q_proj.base_layer.weight.data.view(-1)[:4096]
        assert torch.equal(nan_region, bf16_nan_bytes(4096))
        for layer in model.model.layers:
            layer.reshard()

        # (b) logits and LoRA gradients equal the unsharded model's, bit for bit (same input on every rank).
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
        # FSDP averages the ranks' (here equal) gradients: exact over 2 ranks; over 3, (x + x + x) / 3
        # rounds twice, within 4 ulps.
        assert_same_logits_and_lora_grads(model, reference, ids, rtol=0.0 if world & (world - 1) == 0 else 5e-7)
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                assert m.weight.grad is None  # frozen: never reduce-scattered

        # The fused Triton kernels (on a CPU in Triton's interpreter: one small layer) read the gathered
        # weight as any Params4bit; the path a layer keeps from its first call stays valid across all-gathers.
        x = torch.randn(3, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(4))
        fused, fused_ref = model.model.layers[1].self_attn.k_proj, reference.model.layers[1].self_attn.k_proj
        for layer in (fused, fused_ref):
            layer.set_kernels("triton")
        with torch.no_grad():
            want = fused_ref(x)
            for _ in range(2):
                model.model.layers[1].unshard()
                assert torch.equal(fused(x), want)
                model.model.layers[1].reshard()
        assert list(fused._paths.values())[0] is not None  # the fused path ran, not PyTorch
        for layer in (fused, fused_ref):
            layer.set_kernels("auto")

        # (d) AdamW on a global batch split by rows, the loss over the global count of target tokens
        # (training/loop.py: x world, since FSDP averages gradients over ranks) == one process.
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        ref_params = _lora_named(reference)
        initial = {name: p.detach().clone() for name, p in ref_params.items()}
        opt = torch.optim.AdamW(list(_lora_named(model).values()), lr=1e-2)
        ref_opt = torch.optim.AdamW(list(ref_params.values()), lr=1e-2)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            ids = torch.randint(0, CONFIG["vocab_size"], (4, 10), generator=gen)
            labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, -100, ids)  # masked prompt tokens
            n_targets = (labels[:, 1:] != -100).sum()
            rows = torch.tensor_split(torch.arange(4), world)[rank]
            (_loss_sum(model, ids[rows], labels[rows]) * world / n_targets).backward()
            (_loss_sum(reference, ids, labels) / n_targets).backward()
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad(set_to_none=True)
        moved = 0
        for name, p in _lora_named(model).items():
            # Rows are summed on each rank, then across ranks: fp32 summation order differs from one process,
            # and AdamW divides by sqrt(v), so an entry whose gradient is at rounding level may move by a
            # small fraction of lr differently (seen: 6e-6 at lr 1e-2); 1e-4 allows that, not a wrong step.
            torch.testing.assert_close(p.full_tensor(), ref_params[name], rtol=1e-5, atol=1e-4, msg=name)
            moved += not torch.equal(ref_params[name], initial[name])
        assert moved == len(initial)
        if world == 2:
            _dora_matches_one_process(folder, mesh)
    finally:
        dist.destroy_process_group()


def _dora_matches_one_process(folder: str, mesh) -> None:
    """DoRA's row norm dequantizes the base inside forward: it reads the gathered weight as any Params4bit."""
    from torch.distributed.fsdp import fully_shard

    dora = dict(LORA, use_dora=True, targets=["q_proj", "down_proj"])
    reference, model = (load_base(folder, device="cpu", lora=dora) for _ in range(2))
    torch.manual_seed(5)
    for a, b in zip(_lora_named(reference).values(), _lora_named(model).values(), strict=True):
        with torch.no_grad():
            a.copy_(a + torch.randn_like(a) * 0.05)
            b.copy_(a)
    make_4bit_shardable(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any("lora_magnitude_vector" in name for name in _lora_named(reference))
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(6))
    assert_same_logits_and_lora_grads(model, reference, ids)


def test_fsdp_on_one_rank_computes_what_the_unsharded_model_computes(tiny_llama_dir):
    """A mesh of one rank (FSDP2 copies a parameter's single all-gather input there, so the shard's parts
    travel as one byte buffer): logits and LoRA gradients bit-equal to the unsharded model, over two steps
    (the second reads the buffers FSDP refilled in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        reference = load_base(tiny_llama_dir, device="cpu", compute_dtype=torch.float32, lora=LORA)
        torch.manual_seed(1)
        model = load_base(tiny_llama_dir, device="cpu", compute_dtype=torch.float32, lora=LORA)
        make_4bit_shardable(model)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(2))
        for _ in range(2):
            assert_same_logits_and_lora_grads(model, reference, ids)
    finally:
        dist.destroy_process_group()


def test_a_shard_moves_between_devices_as_bytes():
    """What CPU offload asks of a shard (.cpu()/.to(device, non_blocking) before each all-gather): every part
    moves, the groups and size stay; a float dtype is refused (the bytes would be reinterpreted)."""
    weight = ShardableParams4bit.wrap(quantized(448, 192, True).weight)
    shard = weight.shards(2)[1]
    moved = shard.to("meta", non_blocking=True)
    assert type(moved).__name__ == "NF4Shard" and moved.shape == shard.shape
    assert all(t.is_meta for t in moved.inner())
    assert [t.shape for t in moved.inner()] == [t.shape for t in shard.inner()]
    with pytest.raises(NotImplementedError, match="bytes"):
        shard.to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_on_one_cuda_rank_feeds_the_gathered_weight_to_the_fused_kernels(tiny_llama_dir, offload):
    """On CUDA the LoRA layers run the fused Triton kernels over the weight FSDP gathers (its all-gather
    buffers, on FSDP's streams): bf16 logits as the unsharded model's (the kernels' GPU-test tolerance).
    With CPU offload the shards live in pinned host memory and move to the GPU for each all-gather."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        reference, model = (load_base(tiny_llama_dir, device="cuda", lora=LORA) for _ in range(2))
        for m in (reference, model):
            set_kernel_mode(m, "triton")
        make_4bit_shardable(model)
        mesh = init_device_mesh("cuda", (1,))
        policy = CPUOffloadPolicy() if offload else OffloadPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, offload_policy=policy)
        fully_shard(model, mesh=mesh, offload_policy=policy)
        shard = model.model.layers[0].mlp.down_proj.base_layer.weight._local_tensor
        assert all(t.device.type == ("cpu" if offload else "cuda") for t in shard.inner())
        assert not offload or shard.is_pinned()
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), device="cuda")
        want = reference(input_ids=ids).logits.float()
        for _ in range(2):  # the second forward reads the buffers refilled in place
            got = model(input_ids=ids).logits.float()
            assert (got - want).abs().max() <= 1e-2 * want.abs().max()
        assert all(None not in layer._paths.values() for layer in lora_layers(model).values())
        got.square().mean().backward()  # LoRA gradients come back (to the host with offload)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g.full_tensor()).all() for g in grads)
    finally:
        dist.destroy_process_group()
