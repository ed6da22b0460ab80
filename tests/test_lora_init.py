"""LoRA initialisations (minilora/lora_init.py) against their references: PEFT's `init_lora_weights=
"pissa" | "olora"` and its conversion to a plain LoRA on the same full-precision weights, LoftQ's
definition (a float64 SVD of bitsandbytes' own quantization error), and PEFT loading every init's adapter
onto the ordinary 4-bit base.

Singular vectors and QR factors are unique only up to the sign of each rank-one component (u_i, v_i) ->
(-u_i, -v_i): before comparing, each component of ours takes the sign of the reference's (the products
B A, and so the model, do not depend on it)."""

import json

import bitsandbytes as bnb
import pytest
import torch
from lora_utils import tokens
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import minilora
from minilora.errors import UserError
from minilora.lora_init import loftq_factors, olora_factors, pissa_factors, top_singular

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
TOL = 1e-5


def ours_full_precision(path, init, use_rslora=False):
    torch.manual_seed(0)
    return minilora.load_base(path, quant="none", compute_dtype=torch.float32, device="cpu",
                              lora=dict(r=8, alpha=16, dropout=0.0, targets=TARGETS, init=init, use_rslora=use_rslora))


def peft_full_precision(path, init, use_rslora=False):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=init,
                        use_rslora=use_rslora, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def peft_layers(peft_model):
    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def align_signs(a, b, ref_a):
    """(a, b) with component i negated where its row of A points away from the reference's."""
    signs = torch.sign((a * ref_a).sum(dim=1))  # (r,)
    signs[signs == 0] = 1
    return a * signs[:, None], b * signs[None, :]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_base_equal_peft(tiny_model_dir, init):
    path = tiny_model_dir("phi3")
    ours, ref = ours_full_precision(path, init), peft_full_precision(path, init)
    ref_layers = peft_layers(ref)
    layers = minilora.lora_layers(ours)
    assert sorted(layers) == sorted(ref_layers) and len(layers) == 8
    for name, layer in layers.items():
        peft_layer = ref_layers[name]
        ref_a, ref_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        a, b = align_signs(layer.lora_A.detach(), layer.lora_B.detach(), ref_a)
        torch.testing.assert_close(a, ref_a, atol=TOL, rtol=0)
        torch.testing.assert_close(b, ref_b, atol=TOL, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, atol=TOL, rtol=0)
        assert layer.base_changed and torch.equal(layer.initial_A, layer.lora_A)


def decaying(rows, cols, seed=0):
    """A (rows, cols) matrix with singular values 0.5^i: sigma_9 / sigma_8 = 0.5, a well-defined top-8 subspace."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return u @ torch.diag(0.5 ** torch.arange(float(k))) @ v.T


def test_randomized_pissa_finds_the_top_singular_part():
    """pissa:N's scale · B A is the best rank-r approximation of W once the subspace iterations converge
    (a spectrum that decays, as trained weights' do; a flat random one leaves the top-r subspace ill-defined)."""
    w = decaying(96, 80)
    exact = pissa_factors(w, 8, 2.0)
    torch.manual_seed(1)
    randomized = pissa_factors(w, 8, 2.0, niter=12)  # error ~ 0.5 ** (2 * 12 + 1)
    torch.testing.assert_close(randomized[1] @ randomized[0], exact[1] @ exact[0], atol=TOL, rtol=0)


def test_randomized_loftq_keeps_the_ordinary_base(tiny_model_dir):
    path = tiny_model_dir("phi3")
    lora = dict(r=8, alpha=16, dropout=0.0, targets=TARGETS)
    plain = minilora.load_base(path, compute_dtype=torch.float32, device="cpu", lora=dict(lora, init="zeros"))
    torch.manual_seed(0)
    fitted = minilora.load_base(path, compute_dtype=torch.float32, device="cpu", lora=dict(lora, init="loftq:2"))
    layers, plain_layers = minilora.lora_layers(fitted), minilora.lora_layers(plain)
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, plain_layers[name].base_layer.weight), name
        assert not layer.base_changed and layer.lora_B.abs().sum() > 0, name


@pytest.mark.parametrize("shape", [(96, 80), (80, 96), (200, 64), (64, 64)])
def test_top_singular_equals_the_float64_svd(shape):
    """The Gram-matrix route gives an SVD's top-r triplets: values to fp32 precision, vectors up to sign."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g) * torch.linspace(0.2, 3.0, shape[1])  # unequal columns: distinct values
    u, s, vh = top_singular(w, 8)
    ref_u, ref_s, ref_vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert u.shape == (shape[0], 8) and s.shape == (8,) and vh.shape == (8, shape[1])
    torch.testing.assert_close(s.double(), ref_s[:8], atol=0, rtol=1e-6)
    signs = torch.sign((vh.double() * ref_vh[:8]).sum(dim=1))
    torch.testing.assert_close(vh.double() * signs[:, None], ref_vh[:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(u.double() * signs[None, :], ref_u[:, :8], atol=1e-5, rtol=0)


def test_top_singular_of_a_rank_deficient_matrix_keeps_its_zero_part_zero():
    w = torch.zeros(64, 48)
    w[:, :3] = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))  # rank 3 < r = 8
    u, s, vh = top_singular(w, 8)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    torch.testing.assert_close((u * s) @ vh, w, atol=1e-5, rtol=0)
    a, b = pissa_factors(w, 8, 2.0)
    torch.testing.assert_close(2.0 * b @ a, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(96, 80), (80, 96)])
def test_olora_from_the_first_r_columns_equals_the_whole_qr(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    q, rr = torch.linalg.qr(w)
    a, b = olora_factors(w, 8, 2.0)
    torch.testing.assert_close(a, rr[:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(b, q[:, :8], atol=1e-5, rtol=0)
    assert torch.equal(torch.tril(a[:, :8], diagonal=-1), torch.zeros(8, 8))  # R's zeros stay exact zeros


def test_randomized_loftq_finds_the_best_rank_r_fit_when_the_error_spectrum_decays():
    """loftq:N = loftq once the subspace iterations converge; `dequantized` stands for deq(Q), so that
    E = W - deq(Q) is a matrix with a known, decaying spectrum."""
    error = decaying(96, 80)
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(4))
    exact = loftq_factors(w, w - error, 8, 2.0)
    torch.manual_seed(1)
    randomized = loftq_factors(w, w - error, 8, 2.0, niter=12)  # error ~ 0.5 ** (2 * 12 + 1)
    torch.testing.assert_close(randomized[1] @ randomized[0], exact[1] @ exact[0], atol=TOL, rtol=0)
    u, s, vh = torch.linalg.svd(error.double())
    best = (u[:, :8] * s[:8]) @ vh[:8]
    torch.testing.assert_close(2.0 * (exact[1] @ exact[0]).double(), best, atol=TOL, rtol=0)


def perturb(pairs, seed=3):
    """The same 'training' step on both models: fixed random additions to every A and B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a_params in pairs:
            delta = torch.randn(a_params[0].shape, generator=g) * 0.05
            for p in a_params:
                p.add_(delta)


@pytest.mark.parametrize("init,use_rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_converted_adapter_equals_peft_conversion(tiny_model_dir, tmp_path, init, use_rslora):
    path = tiny_model_dir("phi3")
    ours, ref = ours_full_precision(path, init, use_rslora), peft_full_precision(path, init, use_rslora)
    ref.save_pretrained(tmp_path / "peft-initial")
    layers, ref_layers = minilora.lora_layers(ours), peft_layers(ref)
    for name, layer in layers.items():
        peft_layer = ref_layers[name]
        ref_a = peft_layer.lora_A["default"].weight
        with torch.no_grad():  # the same sign convention, so the converted tensors compare directly
            a, b = align_signs(layer.lora_A, layer.lora_B, ref_a)
            layer.lora_A.copy_(a), layer.lora_B.copy_(b), layer.initial_A.copy_(a), layer.initial_B.copy_(b)
    perturb([(layers[n].lora_A, ref_layers[n].lora_A["default"].weight) for n in sorted(layers)]
            + [(layers[n].lora_B, ref_layers[n].lora_B["default"].weight) for n in sorted(layers)])
    ref.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-initial"))
    minilora.save_adapter(ours, tmp_path / "ours", path)

    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert config[key] == pytest.approx(ref_config[key]), key
    assert config["r"] == 16 and config["init_lora_weights"] is True
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ref_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors.keys() == ref_tensors.keys()
    for key, value in tensors.items():
        torch.testing.assert_close(value, ref_tensors[key], atol=TOL, rtol=0)


def test_loftq_is_the_best_rank_r_fit_of_the_quantization_error(tiny_model_dir):
    """scale · B A = the rank-8 truncated SVD (float64) of W - deq(Q), Q from bitsandbytes' own NF4 with
    double quantization, and the base is that Q itself, byte for byte."""
    path = tiny_model_dir("phi3")
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    model = minilora.load_base(path, compute_dtype=torch.float32, device="cpu",
                               lora=dict(r=8, alpha=32, dropout=0.0, targets=TARGETS, init="loftq"))
    plain = minilora.load_base(path, compute_dtype=torch.float32, device="cpu")
    for name, layer in minilora.lora_layers(model).items():
        w = full.get_submodule(name).weight.data
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        error = (w - bnb.functional.dequantize_4bit(packed, state)).double()  # (out, in)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        best = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]
        torch.testing.assert_close(layer.delta_weight().double(), best, atol=TOL * float(error.abs().max()), rtol=0)
        assert torch.equal(layer.base_layer.weight.data, packed)
        assert torch.equal(layer.base_layer.weight.data, plain.get_submodule(name).weight.data)
        assert not layer.base_changed
        assert torch.linalg.norm(error - layer.delta_weight().double()) < torch.linalg.norm(error)


@pytest.mark.parametrize("init", ["zeros", "loftq", "pissa", "olora"])
def test_every_init_loads_in_peft_on_the_ordinary_4bit_base(tiny_model_dir, tmp_path, init):
    path = tiny_model_dir("phi3")
    torch.manual_seed(0)
    model = minilora.load_base(path, compute_dtype=torch.float32, device="cpu",
                               lora=dict(r=8, alpha=16, dropout=0.0, init=init))
    perturb([(layer.lora_B,) for layer in minilora.lora_layers(model).values()])
    minilora.save_adapter(model, tmp_path / "a", path)
    ours = minilora.load_base(path, compute_dtype=torch.float32, device="cpu")
    minilora.load_adapter(ours, tmp_path / "a")
    ours.eval()
    base = minilora.load_base(path, compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, str(tmp_path / "a"))(tokens()).logits
        our_logits = ours(tokens()).logits
        trained = model.eval()(tokens()).logits
    scale = float(peft_logits.abs().max())
    torch.testing.assert_close(our_logits, peft_logits, atol=1e-4 * scale, rtol=1e-4)
    if init in ("zeros", "loftq"):  # the base is the ordinary one: the saved adapter is the trained model
        torch.testing.assert_close(our_logits, trained, atol=1e-5 * scale, rtol=1e-5)


def test_dora_with_an_init_is_refused(tiny_model_dir):
    with pytest.raises(UserError, match="DoRA"):
        minilora.load_base(tiny_model_dir("phi3"), device="cpu", lora=dict(use_dora=True, init="pissa"))


def test_an_init_on_an_already_4bit_base_is_refused(tiny_model_dir):
    model = minilora.load_base(tiny_model_dir("phi3"), device="cpu")
    with pytest.raises(UserError, match="full-precision weights"):
        minilora.add_lora(model, init="olora")


@pytest.mark.parametrize("init", ["svd", "pissa:x", "olora:2", "loftq:", "zeros:1"])
def test_unknown_init_is_one_line(tiny_model_dir, init):
    model = minilora.load_base(tiny_model_dir("phi3"), quant="none", device="cpu")
    with pytest.raises(UserError, match="init"):
        minilora.add_lora(model, init=init)


def test_loftq_needs_a_4bit_base(tiny_model_dir):
    with pytest.raises(UserError, match="quantization error"):
        minilora.load_base(tiny_model_dir("phi3"), quant="none", device="cpu", lora=dict(init="loftq"))


def test_a_rank_above_a_weights_smaller_side_is_one_line(tiny_model_dir):
    with pytest.raises(UserError, match="at most its smaller side"):
        minilora.load_base(tiny_model_dir("phi3"), device="cpu", lora=dict(r=65, init="pissa"))
