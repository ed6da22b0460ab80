"""Training on a CUDA device (bf16, the fused kernels, offload): run by benchmarks/gpu_suite.sh."""

import pytest
import torch
from train_utils import run_quick

import minilora
from minilora.kernel_check import check_kernels
from minilora.training.run_plots import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def train_losses(folder):
    return [m["loss"] for m in read_metrics(folder / "metrics.jsonl") if m["kind"] == "train"]


def test_bf16_run_with_triton_kernels_tracks_the_torch_path(tmp_path):
    quick = dict(max_steps=6, dropout=0.0, precision="bf16", eval_every=0, save_every=0)
    assert run_quick(tmp_path / "torch", kernels="torch", **quick) == 0
    assert run_quick(tmp_path / "triton", kernels="triton", **quick) == 0
    ours, ref = train_losses(tmp_path / "triton"), train_losses(tmp_path / "torch")
    assert len(ours) == 6 and ours[-1] < ours[0]
    assert ours == pytest.approx(ref, rel=2e-2)  # bf16 rounding in different summation orders


def test_dispatch_uses_triton_on_cuda_for_supported_layers():
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model)
    layer = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    assert layer.fused_kernel(x) is not None
    down = model.model.layers[0].mlp.down_proj  # K = 688, not a multiple of 64: PyTorch path
    assert down.fused_kernel(torch.randn(3, 688, device="cuda")) is None


def test_offload_on_cuda_keeps_gradients(tmp_path):
    quick = dict(max_steps=3, dropout=0.0, precision="bf16", eval_every=0, save_every=0, recompute="full")
    assert run_quick(tmp_path / "plain", **quick) == 0
    assert run_quick(tmp_path / "offload", offload_activations=True, **quick) == 0
    assert train_losses(tmp_path / "offload") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_pass_the_check_against_pytorch_on_this_gpu(dtype):
    assert check_kernels("cuda:0", dtype) is None


def test_auto_mode_training_run_takes_the_fused_path(tmp_path, monkeypatch):
    """Training evaluates before step 1 (under no_grad) and recomputes checkpointed layers: `auto` must
    serve both with the kernels, never quietly fall back to PyTorch."""
    fused_calls = []
    real = minilora.LoRALinear.fused_kernel

    def counting(layer, x):
        fused = real(layer, x)
        if fused is not None:  # the layer's forward runs the fused kernel
            fused_calls.append(torch.is_grad_enabled())
        return fused

    monkeypatch.setattr(minilora.LoRALinear, "fused_kernel", counting)
    assert run_quick(tmp_path, kernels="auto", max_steps=3, precision="bf16", save_every=0) == 0
    # Fused calls in evaluation (no grad) and in training (grad): the kernels served both.
    assert set(fused_calls) == {False, True}
