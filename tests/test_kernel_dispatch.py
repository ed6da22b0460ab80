"""LoRALinear's choice between the Triton kernels and the PyTorch path, and their agreement.

On a CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): the same code
path as on a GPU, in fp32 here (the interpreter's bf16 dot is broken; bf16 is tested on GPUs).
"""

import sys

import bitsandbytes as bnb
import pytest
import torch
from train_utils import run_quick

import minilora
import minilora.dispatch
from minilora.kernel_check import check_against_pytorch, check_kernels
from minilora.training.run_plots import read_metrics

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32, different summation order (tiled GEMM vs bnb dequant + mm)


def lora_4bit_layer(k=128, n=96, dropout=0.1):
    base = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                             compress_statistics=True)
    torch.manual_seed(0)
    base.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.05, requires_grad=False, quant_type="nf4",
                                    compress_statistics=True)
    base.bias = torch.nn.Parameter(torch.randn(n) * 0.1, requires_grad=False)
    base = base.to("cpu")  # the move quantizes the weight
    base.weight = base.weight._quantize("cpu") if not base.weight.bnb_quantized else base.weight
    layer = minilora.LoRALinear(base, r=8, alpha=16, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


def run_layer(layer, x, mode):
    layer.set_kernels(mode)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # same dropout mask on both paths
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("rows", [1, 17, 130])
def test_triton_path_matches_the_torch_path_with_dropout(rows):
    layer = lora_4bit_layer()
    layer.train()
    x = torch.randn(rows, 128)
    assert layer.kernel_mode == "auto" and layer.fused_kernel(x) is None  # auto on CPU: PyTorch
    torch_out = run_layer(layer, x, "torch")
    triton_out = run_layer(layer, x, "triton")
    assert layer.fused_kernel(x) is not None
    for a, b in zip(torch_out, triton_out, strict=True):
        torch.testing.assert_close(b, a, **TOL)


def test_auto_mode_never_imports_the_kernels_on_cpu(monkeypatch):
    """Fails if `auto` on a CPU imports the kernels: the import raises, and the layer would not run."""
    monkeypatch.setitem(sys.modules, "minilora.kernels", None)  # importing it now raises ImportError
    layer = lora_4bit_layer(dropout=0.0)
    x = torch.randn(3, 128)
    y = layer(x)
    assert layer.fused_kernel(x) is None  # decided: PyTorch
    with torch.no_grad():  # and PyTorch computed the layer: base + scale * B A x
        torch.testing.assert_close(y, layer.base_layer(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scale)


def test_the_decision_is_kept_per_device_and_dtype_until_the_base_changes():
    layer = lora_4bit_layer()
    layer.set_kernels("triton")
    x = torch.randn(3, 128)
    fused = layer.fused_kernel(x)
    assert fused is not None and layer.fused_kernel(x) is fused  # decided once, then looked up
    assert layer.fused_kernel(x.half()) is not fused  # another dtype: its own decision
    layer.to("cpu")  # a move (here a no-op) may replace the base weight: decide again
    assert layer.fused_kernel(x) is not fused
    layer.dequantize_base(torch.float32)
    assert layer.fused_kernel(x) is None  # no 4-bit weight any more: PyTorch


def test_set_kernel_mode_sets_every_lora_layer_of_a_model():
    model = torch.nn.Sequential(lora_4bit_layer(), torch.nn.ReLU(), lora_4bit_layer(k=96, n=128))
    minilora.set_kernel_mode(model, "torch")
    assert [model[0].kernel_mode, model[2].kernel_mode] == ["torch", "torch"]
    with pytest.raises(minilora.UserError, match="kernel mode 'fast'"):
        minilora.set_kernel_mode(model, "fast")


def test_environment_variable_chooses_the_mode(monkeypatch):
    monkeypatch.setenv("MINILORA_KERNELS", "torch")
    assert lora_4bit_layer().kernel_mode == "torch"
    monkeypatch.setenv("MINILORA_KERNELS", "fast")
    layer = lora_4bit_layer()
    with pytest.raises(minilora.UserError, match="MINILORA_KERNELS='fast'"):
        layer(torch.randn(2, 128))
    layer.set_kernels("torch")  # a mode given as an argument wins over the environment
    assert layer(torch.randn(2, 128)).shape == (2, 96)


@pytest.mark.slow
def test_triton_training_run_tracks_the_torch_run(tmp_path, small_chat_model):
    # 71-96 rows per step (the tiled branch); the small model keeps the interpreter's work to seconds.
    quick = dict(model=small_chat_model, max_steps=3, batch_size=2, grad_accum=1,
                 seq_len=48, eval_every=0, save_every=0, eval_fraction=0.0, recompute="none")
    assert run_quick(tmp_path / "torch", kernels="torch", **quick) == 0
    assert run_quick(tmp_path / "triton", kernels="triton", **quick) == 0
    losses = [[m["loss"] for m in read_metrics(tmp_path / run / "metrics.jsonl") if m["kind"] == "train"]
              for run in ("torch", "triton")]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_the_kernel_check_passes_the_real_kernels_and_catches_broken_ones():
    """`python -m minilora.env --check` and the GPU suite: the kernels reproduce PyTorch (here in the
    interpreter, in fp32); a kernel that computes something else, or raises, is reported in one line."""
    assert check_kernels("cpu", torch.float32) is None

    def broken(x, weight, bias, a, b, scale, dropout=None):
        return torch.zeros(*x.shape[:-1], b.shape[0], dtype=x.dtype) + x.sum() * 0

    assert "differs from PyTorch" in check_against_pytorch(broken, "cpu", torch.float32)

    def raising(*args):
        raise RuntimeError("PTX compilation failed")

    assert check_against_pytorch(raising, "cpu", torch.float32) == "RuntimeError: PTX compilation failed"
