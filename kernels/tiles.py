"""Which kernel variant a fused LoRA GEMM launches, and with which tiles (fused_lora.py launches them).

The GEMMs dispatch on M, the number of rows:
    M <= SMALL_M_MAX                  split-K: few rows, so the reduction dim is split across programs
                                      to fill the GPU; fp32 partials are summed by a second kernel
    SMALL_M_MAX < M < LARGE_M_MIN     tiled GEMM with in-loop dequant, one program per output tile
    M >= LARGE_M_MIN                  dequant W to a temporary buffer + cuBLAS (faster once the
                                      dequant is amortised over enough rows)
    fp32 on a GPU, any M              dequant + cuBLAS (FP32_TO_CUBLAS): an IEEE fp32 tl.dot has no
                                      tensor cores, and at these tiles its FMA loops spill registers
                                      (benchmarks/kernel_compile.py); the interpreter keeps the M rule,
                                      so the CPU tests reach every branch in fp32

Tile sizes were chosen so that every launch compiles without register spills for sm_90 and sm_80
under triton 3.6 and 3.9 (benchmarks/results/*-kernel-compile-*.md); their speed is not yet measured.
"""

from dataclasses import dataclass
from functools import cache

import torch
import triton

from .nf4 import interpreted

# Dispatch thresholds on M (rows of X). Defaults reasoned from H100 numbers (bitsandbytes calibrates
# its own fused kernel to win up to M ~ 320-512 there), not yet measured for these kernels:
# benchmarks/bench_kernels.py sweeps every branch per M and prints the crossovers to set them from.
SMALL_M_MAX = 64
LARGE_M_MIN = 512
FP32_TO_CUBLAS = True
# `meta` tensors have no device to ask: benchmarks/kernel_compile.py launches on them, and sets this to
# the SM count of the GPU it compiles for so that split-K sizes are that GPU's.
META_SM_COUNT = 132


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of one launch. W tiles are (bn, bk); `split` programs share each output tile."""

    bm: int
    bn: int
    bk: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


def branch_for(m: int, dtype: torch.dtype) -> str:
    if dtype == torch.float32 and FP32_TO_CUBLAS and not interpreted():
        return "dequant"
    if m <= SMALL_M_MAX:
        return "splitk"
    if m >= LARGE_M_MIN:
        return "dequant"
    return "tiled"


@cache
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device)
    if device.type == "meta":
        return META_SM_COUNT
    return 4  # the interpreter: a few programs, so that CPU tests still split


def _split(tiles: int, steps: int, device: torch.device) -> int:
    """How many programs share one output tile's reduction: about 2 waves, at most one step each."""
    return max(1, min(triton.cdiv(2 * sm_count(device), tiles), steps))


def _splitk_bm(m: int) -> int:
    return min(64, max(16, triton.next_power_of_2(m)))  # tl.dot needs >= 16 rows


def _splitk_warps(bm: int) -> int:
    return 8 if bm >= 64 else 4  # with 4 warps the 64x64 tile spilled on sm_80 under triton 3.6


# The tiled configs use 8 warps and 64 rows: the fp32 W tile being dequantized and the accumulator
# share the registers, and with 4 warps (or 128 rows) the tile used all 255 registers on sm_80 or
# spilled (kernel_compile.py, triton 3.6 and 3.9, before these sizes were chosen).
def fwd_config(branch: str, m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """Tiles for Y (m, n) = X (m, k) @ W^T. Untuned defaults: tests and the benchmark replace this."""
    if branch == "splitk":
        return _splitk_config(m, n, k, device)
    return TileConfig(64, 128, 64, 1, 8, 3)


def dx_config(branch: str, m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """Tiles for dX (m, k) = dY (m, n) @ W: output tiles (bm, bk), reduction over n in steps of bn."""
    if branch == "splitk":
        return _splitk_config(m, k, n, device)
    return TileConfig(64, 64, 128, 1, 8, 3)


def _splitk_config(m: int, cols: int, depth: int, device: torch.device) -> TileConfig:
    """64x64 W tiles; (m, cols) output, a reduction of `depth` split over programs."""
    bm = _splitk_bm(m)
    tiles = triton.cdiv(m, bm) * triton.cdiv(cols, 64)
    return TileConfig(bm, 64, 64, _split(tiles, triton.cdiv(depth, 64), device), _splitk_warps(bm), 4)
