"""The Triton kernels on a GPU, in bf16, at Phi-3-mini's real layer shapes (skipped without CUDA).

bf16 cannot be tested on CPU (the interpreter's bf16 tl.dot is wrong), and these shapes are too big
for the interpreter. Tolerances (max |ours - reference| / max |reference|, per tensor):
    bf16 output and dX   1e-2   each side rounds its outputs to bf16 (2^-8 = 3.9e-3 relative) and
                                sums up to 16384 products in a different order
    bf16 dA, dB          1e-2   ours rounds S and G = s dY B to bf16 where the reference keeps fp32
    odd-shape dA, dB     2e-2   at M as small as 1 and 3 no sum averages the bf16 rounding of S and G
                                out: up to 1.2e-2 in a reviewer's bf16 emulation (not committed)
Dequant is exact: equal values to bitsandbytes' CUDA kernel, with and without double quant.
"""

from functools import partial

import pytest
import torch

from minilora.dropout import lora_dropout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (N out, K in) of the four Phi-3-mini linears LoRA targets.
PHI3 = {"qkv_proj": (9216, 3072), "o_proj": (3072, 3072), "gate_up_proj": (16384, 3072),
        "down_proj": (3072, 8192)}
TOL_BF16 = 1e-2
TOL_BF16_ODD = {"y": 1e-2, "dx": 1e-2, "dbias": 1e-2, "dA": 2e-2, "dB": 2e-2}


@pytest.fixture(scope="module")
def K():
    import minilora.kernels

    return minilora.kernels


@pytest.fixture(scope="module")
def weights():
    """name -> (nested Params4bit, plain Params4bit), made once (quantizing is the slow part)."""
    import bitsandbytes as bnb

    made = {}

    def get(name, nested=True):
        if (name, nested) not in made:
            torch.manual_seed(0)
            w = (torch.randn(PHI3[name], device="cuda") * 0.02).to(torch.bfloat16)
            made[name, nested] = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                                   compress_statistics=nested).to("cuda")
        return made[name, nested]

    return get


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [PHI3["qkv_proj"], PHI3["down_proj"], (130, 192)])
def test_dequant_bf16_equals_bitsandbytes_on_cuda(K, shape, nested, quant_type):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    ours = K.dequantize_4bit(packed, state, torch.bfloat16)
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))
    for dtype in (torch.float16, torch.float32):  # another dtype: rounded once from the fp32 product
        assert torch.equal(K.dequantize_4bit(packed, state, dtype),
                           K.dequantize_4bit_reference(packed, state, dtype))


@pytest.mark.parametrize("branch", ["splitk", "tiled", "dequant"])
def test_fused_gemms_read_exactly_the_dequantized_weight_bf16(K, weights, branch):
    """I @ W^T and I @ W in bf16 have one nonzero product per output: they must equal W exactly."""
    weight = weights("o_proj")
    n, k = PHI3["o_proj"]
    pk = K.nf4.pack_state(weight.data, weight.quant_state)
    w = K.dequantize_4bit_reference(weight.data, weight.quant_state, torch.bfloat16)  # (N, K)
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert torch.equal(K.fused_lora.base_lora_forward(eye, pk, None, None, 1.0, None, branch), w.t())
        assert torch.equal(K.fused_lora.base_lora_dx(eye, pk, None, None, branch), w)


@pytest.mark.parametrize("m", [1, 16, 256, 4096])
@pytest.mark.parametrize("name", list(PHI3))
def test_fused_bf16_phi3_shapes_match_reference(K, weights, name, m):
    n, k = PHI3[name]
    weight = weights(name)
    g = torch.Generator(device="cuda").manual_seed(m)
    a = (torch.randn(8, k, device="cuda", generator=g) * 0.02).requires_grad_()
    b = (torch.randn(n, 8, device="cuda", generator=g) * 0.02).requires_grad_()
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", generator=g, dtype=torch.bfloat16)
    p = 0.05 if m == 256 else 0.0  # the default recipe's LoRA dropout, on one M per shape

    results = []
    for fn in (K.lora_linear_4bit, K.lora_linear_4bit_reference):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        y = fn(xi, weight, None, a, b, 2.0, partial(lora_dropout, p=p) if p else None)
        results.append((y, *torch.autograd.grad(y, [xi, a, b], dy)))
    for what, ours, ref in zip(["y", "dx", "dA", "dB"], *results, strict=True):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        err = rel_err(ours, ref)
        assert err <= TOL_BF16, f"{name} M={m} {what}: {err:.2e}"


@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_fused_bf16_plain_absmax_and_bias(K, weights, m):
    """Absmax without double quant, with a bias, 3-D input, o_proj shape."""
    n, k = PHI3["o_proj"]
    weight = weights("o_proj", nested=False)
    g = torch.Generator(device="cuda").manual_seed(m)
    a = (torch.randn(16, k, device="cuda", generator=g) * 0.02).requires_grad_()
    b = (torch.randn(n, 16, device="cuda", generator=g) * 0.02).requires_grad_()
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    x = torch.randn(2, (m + 1) // 2, k, device="cuda", generator=g, dtype=torch.bfloat16)
    results = []
    for fn in (K.lora_linear_4bit, K.lora_linear_4bit_reference):
        xi = x.clone().requires_grad_()
        y = fn(xi, weight, bias, a, b, 0.5)
        results.append((y, *torch.autograd.grad(y, [xi, bias, a, b], torch.ones_like(y))))
    for what, ours, ref in zip(["y", "dx", "dbias", "dA", "dB"], *results, strict=True):
        err = rel_err(ours, ref)
        assert err <= TOL_BF16, f"M={m} {what}: {err:.2e}"


def test_split_k_is_deterministic(K, weights):
    """Split-K sums fp32 partials in a fixed order: the same input gives the same bits."""
    weight = weights("qkv_proj")
    x = torch.randn(4, 3072, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(8, 3072, device="cuda") * 0.02
    b = torch.randn(9216, 8, device="cuda") * 0.02
    with torch.no_grad():
        first = K.lora_linear_4bit(x, weight, None, a, b, 2.0)
        assert all(torch.equal(first, K.lora_linear_4bit(x, weight, None, a, b, 2.0))
                   for _ in range(3))


@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("branch", ["splitk", "tiled", "dequant"])
def test_fused_bf16_odd_shapes_each_branch(K, branch, m):
    """Masks at odd N, K and M, in every dispatch branch (forced), with dropout and a bias."""
    import bitsandbytes as bnb

    limits = {"splitk": (1 << 40, 1 << 41), "tiled": (0, 1 << 40), "dequant": (0, 0)}[branch]
    forced = K.KernelConfig(small_m_max=limits[0], large_m_min=limits[1])
    n, k = 130, 320
    torch.manual_seed(0)
    weight = bnb.nn.Params4bit((torch.randn(n, k) * 0.05).to(torch.bfloat16), requires_grad=False,
                               quant_type="nf4", compress_statistics=True).to("cuda")
    # LoRA weights of a trained adapter's size: the LoRA term a fraction of the base output, as in use.
    a = (torch.randn(4, k, device="cuda") * 0.05).requires_grad_()
    b = (torch.randn(n, 4, device="cuda") * 0.05).requires_grad_()
    bias = (torch.randn(n, device="cuda") * 0.1).to(torch.bfloat16).requires_grad_()
    x = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)[:, ::2]  # non-contiguous
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (partial(K.lora_linear_4bit, config=forced), K.lora_linear_4bit_reference):
        xi = x.detach().requires_grad_()
        torch.manual_seed(1)
        y = fn(xi, weight, bias, a, b, 2.0, partial(lora_dropout, p=0.1))
        results.append((y, *torch.autograd.grad(y, [xi, bias, a, b], dy)))
    for what, ours, ref in zip(["y", "dx", "dbias", "dA", "dB"], *results, strict=True):
        err = rel_err(ours, ref)
        assert err <= TOL_BF16_ODD[what], f"{branch} M={m} {what}: {err:.2e}"
