"""The Triton kernels against bitsandbytes and the PyTorch reference, on CPU in Triton's interpreter.

Same kernel code as on the GPU; the interpreter's bf16 tl.dot is wrong, so the fused tests run in
fp32 and fp16 here (bf16 in test_kernels_gpu.py). Dequant has no tl.dot and is tested in bf16 too.

Tolerances (max |ours - reference| / max |reference|, per tensor):
    fp32  1e-5   same math, only the summation order differs
    fp16  4e-3   ours rounds the LoRA term and S = dropout(x) A^T to fp16 where the reference keeps
                 fp32, and one rounding of the sum where the reference rounds twice: a few ulps (~5e-4)
Dequant is exact: equal values to bitsandbytes'.
"""

import os

import torch

# Triton reads TRITON_INTERPRET when the kernels are decorated: set it before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from functools import partial  # noqa: E402

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
import minilora.kernels as K  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from minilora.kernels import KernelConfig, TileConfig, fused_lora  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from minilora.dropout import lora_dropout  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 4e-3}
BRANCH_LIMITS = {  # (small_m_max, large_m_min) that send every M to one branch
    "splitk": (1 << 40, 1 << 41),
    "tiled": (0, 1 << 40),
    "dequant": (0, 0),
}


def forcing(branch) -> KernelConfig:
    """Every M to `branch`, fp32 included (on a GPU, fp32 would otherwise always take dequant + cuBLAS)."""
    small, large = BRANCH_LIMITS[branch]
    return KernelConfig(small_m_max=small, large_m_min=large, fp32_to_cublas=False)


def make_weight(n, k, *, nested=True, quant_type="nf4", blocksize=64, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    return bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested,
                             blocksize=blocksize).to(DEV)


def make_lora(n, k, r, dtype, bias, seed=1):
    # B is random, not PEFT's zeros: a wrong LoRA term must show in the output.
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, k, generator=g) * 0.2).to(DEV).requires_grad_()
    b = (torch.randn(n, r, generator=g) * 0.2).to(DEV).requires_grad_()
    bias_t = (torch.randn(n, generator=g) * 0.1).to(DEV, dtype).requires_grad_() if bias else None
    return a, b, bias_t


def assert_close(ours, ref, tol, what):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (what, ours.shape, ref.shape)
    err = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative max error {err:.2e} > {tol:.0e}"


def law(p, training=True):
    """The dropout a LoRA layer hands the kernels: minilora's law at p, None when inactive."""
    return partial(lora_dropout, p=p) if training and p > 0 else None


def run(fn, x, weight, bias, a, b, scale, p, training, seed, **config):
    """{"y", "dx", "dbias", "dA", "dB"} under one seed (so both sides draw the same dropout mask)."""
    x = x.detach().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    y = fn(x, weight, bias, a, b, scale, law(p, training), **config)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y)
    wrt = {name: t for name, t in (("dx", x), ("dbias", bias), ("dA", a), ("dB", b))
           if t is not None and t.requires_grad}
    return {"y": y, **dict(zip(wrt, torch.autograd.grad(y, list(wrt.values()), dy), strict=True))}


def assert_all_close(fn_args, dtype, seed, config=K.DEFAULT_CONFIG):
    ours = run(K.lora_linear_4bit, *fn_args, seed=seed, config=config)
    ref = run(K.lora_linear_4bit_reference, *fn_args, seed=seed)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert_close(ours[name], ref[name], TOL[dtype], name)
    return ours


# --------------------------------------------------------------------------------------- dequant

DQ_SHAPES = [(1, 64), (3, 320), (130, 192)]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", DQ_SHAPES)
def test_dequant_equals_bitsandbytes(shape, dtype, nested):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=dtype).to(DEV)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    ours = K.dequantize_4bit(packed, state, dtype)
    ref = bnbf.dequantize_4bit(packed, state)
    assert ours.dtype == dtype and ours.shape == shape
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("blocksize", [32, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequant_other_blocksizes_and_fp4(quant_type, blocksize):
    torch.manual_seed(0)
    w = torch.randn(5, 256, dtype=torch.float16).to(DEV)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    assert torch.equal(K.dequantize_4bit(packed, state, torch.float16), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(9, 70), (3, 33)])
def test_dequant_blocks_straddling_rows_and_odd_sizes(shape):
    # K % 64 != 0 (a block spans two rows) and an odd element count (half a byte unused).
    torch.manual_seed(0)
    w = torch.randn(shape).to(DEV)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    # bitsandbytes computes odd shapes with its generic PyTorch code under torch.compile; run it eagerly
    # (the same code and products) rather than spend ~10 s compiling it with inductor on a CPU.
    with torch.compiler.set_stance("force_eager"):
        expected = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(K.dequantize_4bit(packed, state, torch.float32), expected)


@pytest.mark.parametrize("block,num_warps", [(2048, 4), (8192, 8)])
def test_dequant_launch_sizes_the_benchmark_sweeps_are_exact_too(block, num_warps):
    # 9 x 1000 elements: a partial last program at every size, blocks straddling rows.
    torch.manual_seed(0)
    w = torch.randn(9, 1000, dtype=torch.float16).to(DEV)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = K.nf4.dequantize_packed(K.nf4.pack_state(packed, state), torch.float16, block, num_warps)
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))
    with pytest.raises(ValueError, match="power of two"):
        K.nf4.dequantize_packed(K.nf4.pack_state(packed, state), torch.float16, 3000)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_to_another_dtype_rounds_once_from_fp32(dtype):
    weight = make_weight(67, 128)
    exact = bnbf.dequantize_4bit(weight.data, weight.quant_state)  # fp32: the exact products
    assert torch.equal(K.dequantize_4bit(weight.data, weight.quant_state, dtype), exact.to(dtype))
    assert torch.equal(K.dequantize_4bit_reference(weight.data, weight.quant_state, dtype), exact.to(dtype))


# ------------------------------------------------------------------------------ fused forward/backward

# Each branch at each M, in both dtypes; the other features rotate across cases so that every one
# of them (3-D input, non-contiguous x, bias, dropout, double quant, odd N and K) meets every branch.
CASES = []
for i, (branch, m) in enumerate((b, m) for b in BRANCH_LIMITS for m in (1, 3, 17, 130)):
    for dtype in (torch.float32, torch.float16):
        j = i + (dtype == torch.float16)
        CASES.append(pytest.param(
            branch, m, dtype,
            dict(n=(130, 67, 64)[i % 3], k=(192, 320, 64)[j % 3], three_d=i % 2 == 1,
                 noncontig=j % 3 == 0, bias=j % 2 == 0, dropout=(0.0, 0.1)[(i // 2) % 2],
                 nested=j % 4 != 3),
            id=f"{branch}-M{m}-{str(dtype)[6:]}"))


def make_x(m, k, dtype, three_d, noncontig):
    g = torch.Generator().manual_seed(m * 1000 + k)
    if three_d:  # (B, T, K) with B*T = m rows; m is prime for 3, 17: use (1, m)
        shape = (2, m // 2, k) if m % 2 == 0 else (1, m, k)
    else:
        shape = (m, k)
    if noncontig:  # every other column of a twice-as-wide tensor
        return torch.randn(*shape[:-1], 2 * k, generator=g).to(DEV, dtype)[..., ::2]
    return torch.randn(shape, generator=g).to(DEV, dtype)


@pytest.mark.parametrize("branch,m,dtype,f", CASES)
def test_fused_forward_and_gradients_match_reference(branch, m, dtype, f):
    n, k = f["n"], f["k"]
    weight = make_weight(n, k, nested=f["nested"])
    a, b, bias = make_lora(n, k, 4, dtype, f["bias"])
    x = make_x(m, k, dtype, f["three_d"], f["noncontig"]).requires_grad_()
    assert x.is_contiguous() != f["noncontig"]
    assert_all_close((x, weight, bias, a, b, 2.0, f["dropout"], True), dtype, seed=5, config=forcing(branch))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("branch", list(BRANCH_LIMITS))
def test_fused_gemms_read_exactly_the_dequantized_weight(branch, dtype, nested):
    """I @ W^T and I @ W have one nonzero product per output: any dequant error shows, unblurred."""
    n, k = 67, 192
    weight = make_weight(n, k, nested=nested)
    pk = K.nf4.pack_state(weight.data, weight.quant_state)
    w = K.dequantize_4bit_reference(weight.data, weight.quant_state, dtype)  # (N, K)
    y = fused_lora.base_lora_forward(torch.eye(k, dtype=dtype, device=DEV), pk, None, None, 1.0, None, branch)
    assert torch.equal(y, w.t())
    dx = fused_lora.base_lora_dx(torch.eye(n, dtype=dtype, device=DEV), pk, None, None, branch)
    assert torch.equal(dx, w)


TILE_CASES = [  # (blocksize, forward tiles, dX tiles): several blocks per tile, a tile inside a block
    (32, TileConfig(16, 32, 64, split=2), TileConfig(16, 32, 64, split=3)),
    (128, TileConfig(16, 64, 64, split=3), TileConfig(32, 16, 64, split=2)),
    (64, TileConfig(32, 16, 128, split=1), TileConfig(16, 64, 128, split=1)),
]


@pytest.mark.parametrize("blocksize,fwd_cfg,dx_cfg", TILE_CASES)
def test_tile_shapes_and_blocksizes(blocksize, fwd_cfg, dx_cfg):
    config = KernelConfig(small_m_max=64, fp32_to_cublas=False, fwd_tiles=fwd_cfg, dx_tiles=dx_cfg)
    weight = make_weight(100, 384, blocksize=blocksize)
    a, b, bias = make_lora(100, 384, 8, torch.float16, True)
    x = make_x(20, 384, torch.float16, False, False).requires_grad_()
    assert_all_close((x, weight, bias, a, b, 0.5, 0.0, True), torch.float16, seed=0, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_bnb_linear4bit_plus_lora(dtype):
    """Against the real module stack: bnb Linear4bit (NF4, double quant) + a LoRA branch."""
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(192, 96, bias=True, compute_dtype=dtype, compress_statistics=True,
                             quant_type="nf4")
    base.bias.data = base.bias.data.to(dtype)
    base = base.to(DEV).train()
    a, b, _ = make_lora(96, 192, 8, dtype, False)
    x = make_x(12, 192, dtype, False, False).requires_grad_()

    def peft_like(x, weight, bias, a, b, scale, dropout):  # PEFT's Linear4bit (masks drawn by our law)
        return base(x) + (F.linear(F.linear(dropout(x.float()), a), b) * scale).to(dtype)

    args = (x, base.weight, base.bias, a, b, 2.0, 0.1, True)
    ours, ref = run(K.lora_linear_4bit, *args, seed=3), run(peft_like, *args, seed=3)
    assert ours.keys() == ref.keys() == {"y", "dx", "dbias", "dA", "dB"}
    for name in ref:
        assert_close(ours[name], ref[name], TOL[dtype], name)


def test_fp4_weights():
    weight = make_weight(40, 128, quant_type="fp4")
    a, b, bias = make_lora(40, 128, 4, torch.float32, True)
    x = make_x(5, 128, torch.float32, False, False).requires_grad_()
    assert_all_close((x, weight, bias, a, b, 1.0, 0.0, True), torch.float32, seed=0)


def test_only_adapter_gradients_when_x_is_frozen():
    weight = make_weight(64, 128)
    a, b, _ = make_lora(64, 128, 4, torch.float16, False)
    x = make_x(4, 128, torch.float16, False, False)  # requires_grad False: no dX computed
    ours = assert_all_close((x, weight, None, a, b, 2.0, 0.1, True), torch.float16, seed=1)
    assert ours.keys() == {"y", "dA", "dB"}


def test_no_dropout_and_empty_input():
    weight = make_weight(64, 128)
    a, b, bias = make_lora(64, 128, 4, torch.float32, True)
    x = make_x(3, 128, torch.float32, False, False)
    with torch.no_grad():
        ours = K.lora_linear_4bit(x, weight, bias, a, b, 2.0)
        ref = K.lora_linear_4bit_reference(x, weight, bias, a, b, 2.0)
        assert_close(ours, ref, TOL[torch.float32], "y")
        dropped = K.lora_linear_4bit(x, weight, bias, a, b, 2.0, law(0.5))
        assert not torch.allclose(dropped, ours)  # the dropout passed in is applied
        empty = K.lora_linear_4bit(x[:0], weight, bias, a, b, 2.0)
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("m", [3, 100])
def test_gradient_of_a_sum_with_a_broadcast_output_gradient(m):
    """y.sum() hands backward a stride-0 (expanded) dY: the kernels read it through its strides."""
    weight = make_weight(67, 128)
    a, b, _ = make_lora(67, 128, 4, torch.float32, False)
    x = make_x(m, 128, torch.float32, True, False).requires_grad_()
    ours = torch.autograd.grad(K.lora_linear_4bit(x, weight, None, a, b, 2.0).sum(), [x, a, b])
    ref = torch.autograd.grad(K.lora_linear_4bit_reference(x, weight, None, a, b, 2.0).sum(),
                              [x, a, b])
    for name, o, r in zip(["dx", "dA", "dB"], ours, ref, strict=True):
        assert_close(o, r, TOL[torch.float32], name)


def test_checkpoint_gives_the_same_gradients():
    """Non-reentrant checkpointing recomputes the forward (same dropout mask): identical gradients."""
    weight = make_weight(130, 192)
    a, b, bias = make_lora(130, 192, 4, torch.float16, True)
    x = make_x(6, 192, torch.float16, True, False).requires_grad_()

    def f(x):
        return K.lora_linear_4bit(x, weight, bias, a, b, 2.0, law(0.2))

    def grads(use_checkpoint):
        torch.manual_seed(7)
        y = checkpoint(f, x, use_reentrant=False) if use_checkpoint else f(x)
        return torch.autograd.grad(y.float().square().sum(), [x, a, b, bias])

    for plain, ckpt in zip(grads(False), grads(True), strict=True):
        assert torch.equal(plain, ckpt)


@pytest.mark.parametrize("branch", list(BRANCH_LIMITS))
def test_backward_saves_no_full_precision_weight(branch):
    n, k = 130, 192
    weight = make_weight(n, k)
    a, b, bias = make_lora(n, k, 4, torch.float16, True)
    x = make_x(8, k, torch.float16, False, False).requires_grad_()  # 8 rows: x is smaller than W
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        K.lora_linear_4bit(x, weight, bias, a, b, 2.0, law(0.1), config=forcing(branch))
    assert saved
    assert not [t.shape for t in saved if t.is_floating_point() and t.numel() >= n * k], \
        [t.shape for t in saved]


# ------------------------------------------------------------------------------ unsupported_reason

def test_unsupported_reason():
    weight = make_weight(64, 128)
    x = torch.randn(2, 128).to(DEV)
    assert K.unsupported_reason(x, weight) is None
    assert K.unsupported_reason(x.double(), weight) == "dtype float64"
    assert K.unsupported_reason(torch.randn(2, 96).to(DEV), make_weight(64, 96)) == "K % 64 != 0"
    assert "features" in K.unsupported_reason(torch.randn(2, 64).to(DEV), weight)
    assert "quant_state" in K.unsupported_reason(x, torch.nn.Parameter(torch.randn(64, 128)))
    assert K.unsupported_reason(x, make_weight(64, 128, quant_type="fp4")) is None
    with pytest.raises(ValueError, match="K % 64 != 0"):
        K.lora_linear_4bit(torch.randn(2, 96).to(DEV), make_weight(64, 96), None,
                           torch.zeros(4, 96), torch.zeros(64, 4), 1.0)


def test_unsupported_reason_sees_the_cpu_repacked_layout():
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place during a no-grad eval
    # forward; the bytes are then no longer in the layout our kernels read.
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    layer.eval()
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        layer.weight.quant_state.packing_format_for_cpu = True  # a CPU without AVX512-BF16: pretend
    reason = K.unsupported_reason(x, layer.weight)
    assert reason == "cpu weights repacked by bitsandbytes (packing_format_for_cpu)"
