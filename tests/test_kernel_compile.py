"""The Triton kernels compile for real GPUs (H100 sm_90, A100 sm_80) without spills or shared-memory
overflow, checked on this CPU with Triton's compiler and the ptxas in the triton wheel
(python -m minilora.kernels.compile_check). The interpreter tests check the math; these check what only the GPU
compiler sees, so a lent GPU's minutes are not spent on a launch that cannot compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["qkv_proj", "down_proj"]  # N > K and K > N
MS = ["1", "32", "64", "256", "4096"]  # split-K with BM 16, 32 and 64, tiled, dequant + cuBLAS


def _have_cuda_toolchain() -> bool:
    try:
        from triton import knobs

        return Path(knobs.nvidia.ptxas.path).is_file() and Path(knobs.nvidia.cuobjdump.path).is_file()
    except Exception:  # noqa: BLE001 - no CUDA backend in this triton build
        return False


pytestmark = pytest.mark.skipif(not _have_cuda_toolchain(), reason="triton without its CUDA toolchain")


@pytest.fixture(scope="module", params=[90, 80], ids=["sm90", "sm80"])
def report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"sm{request.param}") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; the kernels pass their own
    run = subprocess.run([sys.executable, "-m", "minilora.kernels.compile_check", "--arch", str(request.param),
                          "--shapes", *SHAPES, "--ms", *MS, "--json", str(out)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert out.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    data["stdout"], data["returncode"] = run.stdout, run.returncode
    return data


def test_every_launch_compiles_without_spills_or_shared_memory_overflow(report):
    assert report["problems"] == [], "\n".join(report["problems"])
    assert report["returncode"] == 0
    assert all(k["error"] is None for k in report["kernels"])


def test_every_dispatch_branch_and_dtype_was_compiled(report):
    launches = [label for k in report["kernels"] for label in k["launches"]]
    for dtype in ("bfloat16", "float16"):
        for branch in ("splitk", "tiled", "dequant"):
            assert any(dtype in label and f"({branch})" in label for label in launches), (dtype, branch)
    names = {k["kernel"] for k in report["kernels"]}
    assert names == {"_fwd_kernel", "_dx_kernel", "_splitk_reduce_kernel", "_dequant_kernel"}


def test_16bit_gemms_use_tensor_cores_and_fp32_goes_to_cublas(report):
    for k in report["kernels"]:
        operand = k["signature"].get("x_ptr") or k["signature"].get("dy_ptr")
        if k["kernel"] in ("_fwd_kernel", "_dx_kernel"):
            assert operand in ("*bf16", "*fp16"), f"fp32 reached a fused GEMM on a GPU: {k['launches'][0]}"
            # Hopper's warpgroup MMA needs 64 rows per warpgroup; the BM=16 split-K tiles use mma.sync.
            expected = "wgmma" if report["arch"] == 90 and k["constants"]["BM"] >= 64 else "mma"
            assert k["tensor_cores"] == expected, (k["launches"][0], k["tensor_cores"])


def test_problems_flag_spills_shared_memory_compile_errors_and_missing_tensor_cores():
    import minilora.kernels.compile_check as kc

    def entry(**kw):
        base = dict(kernel="_fwd_kernel", constants={"BM": 64}, options={"num_warps": 4, "num_stages": 3},
                    signature={"x_ptr": "*bf16"}, registers=128, stack_bytes=0, local_bytes=0,
                    shared_bytes=1024, tensor_cores="wgmma", launches=["case"])
        return kc.Compiled(**{**base, **kw})

    assert kc.problems([entry()], 90) == []
    found = kc.problems([entry(stack_bytes=16), entry(shared_bytes=240 * 1024), entry(error="CompilationError: x"),
                         entry(tensor_cores="none"), entry(registers=255)], 90)
    assert [("local memory" in p, "shared memory" in p, "does not compile" in p, "tensor-core" in p,
             "all 255 registers" in p) for p in found] == [
        (True, False, False, False, False), (False, True, False, False, False), (False, False, True, False, False),
        (False, False, False, True, False), (False, False, False, False, True)]
    assert kc.problems([entry(shared_bytes=200 * 1024)], 90) == []  # fits 227 KiB on sm_90 ...
    assert len(kc.problems([entry(shared_bytes=200 * 1024)], 80)) == 1  # ... not 163 KiB on sm_80
