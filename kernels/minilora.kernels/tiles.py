"""Which kernel variant a fused LoRA GEMM launches, and with which tiles (fused_lora.py launches them).

The GEMMs dispatch on M, the number of rows (thresholds in `KernelConfig`):
    M <= small_m_max                  split-K: few rows, so the reduction dim is split across programs
                                      to fill the GPU; fp32 partials are summed by a second kernel
    small_m_max < M < large_m_min     tiled GEMM with in-loop dequant, one program per output tile
    M >= large_m_min                  dequant W to a temporary buffer + cuBLAS (faster once the
                                      dequant is amortised over enough rows)
    fp32 on a GPU, any M              dequant + cuBLAS (fp32_to_cublas): an IEEE fp32 tl.dot has no
                                      tensor cores, and at these tiles its FMA loops spill registers
                                      (kernels/compile_check.py); the interpreter keeps the M rule,
                                      so the CPU tests reach every branch in fp32

Tile sizes were chosen so that every launch compiles without register spills for sm_90 and sm_80
under triton 3.6 and 3.9 (benchmarks/results/*-kernel-compile-*.md); `python -m benchmarks.kernels`
times them on a GPU.
"""

from dataclasses import dataclass
from functools import cache

import torch
import triton

from .nf4 import interpreted


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


@dataclass(frozen=True)
class KernelConfig:
    """How the fused GEMMs choose a branch and tiles: passed down from the layer to every launch.

    The M thresholds are reasoned from H100 numbers (bitsandbytes calibrates its own fused kernel to
    win up to M ~ 320-512 there); `python -m benchmarks.kernels` sweeps every branch per M on a GPU and
    prints the crossovers to set them from.
    """

    small_m_max: int = 64  # largest M that takes split-K
    large_m_min: int = 512  # smallest M that takes dequant + cuBLAS
    fp32_to_cublas: bool = True  # fp32 on a GPU always takes dequant + cuBLAS
    # `meta` tensors have no device to ask: kernels/compile_check.py launches on them and sets this
    # to the SM count of the GPU it compiles for, so that split-K sizes are that GPU's.
    meta_sm_count: int = 132
    fwd_tiles: TileConfig | None = None  # forced tiles of every split-K and tiled forward launch
    dx_tiles: TileConfig | None = None  # the same for dX

    def branch_for(self, m: int, dtype: torch.dtype) -> str:
        if dtype == torch.float32 and self.fp32_to_cublas and not interpreted():
            return "dequant"
        if m <= self.small_m_max:
            return "splitk"
        if m >= self.large_m_min:
            return "dequant"
        return "tiled"

    # The tiled configs use 8 warps and 64 rows: the fp32 W tile being dequantized and the accumulator
    # share the registers, and with 4 warps (or 128 rows) the tile used all 255 registers on sm_80 or
    # spilled (compile_check.py, triton 3.6 and 3.9, before these sizes were chosen).
    def fwd_config(self, branch: str, m: int, n: int, k: int, device: torch.device) -> TileConfig:
        """Tiles for Y (m, n) = X (m, k) @ W^T. Untuned defaults."""
        if self.fwd_tiles is not None:
            return self.fwd_tiles
        if branch == "splitk":
            return self._splitk_config(m, n, k, device)
        return TileConfig(64, 128, 64, 1, 8, 3)

    def dx_config(self, branch: str, m: int, n: int, k: int, device: torch.device) -> TileConfig:
        """Tiles for dX (m, k) = dY (m, n) @ W: output tiles (bm, bk), reduction over n in steps of bn."""
        if self.dx_tiles is not None:
            return self.dx_tiles
        if branch == "splitk":
            return self._splitk_config(m, k, n, device)
        return TileConfig(64, 64, 128, 1, 8, 3)

    def sm_count(self, device: torch.device) -> int:
        if device.type == "cuda":
            return _cuda_sm_count(device)
        if device.type == "meta":
            return self.meta_sm_count
        return 4  # the interpreter: a few programs, so that CPU tests still split

    def _splitk_config(self, m: int, cols: int, depth: int, device: torch.device) -> TileConfig:
        """64x64 W tiles; (m, cols) output, a reduction of `depth` split over programs: about 2 waves,
        at most one 64-deep step each."""
        bm = min(64, max(16, triton.next_power_of_2(m)))  # tl.dot needs >= 16 rows
        tiles = triton.cdiv(m, bm) * triton.cdiv(cols, 64)
        split = max(1, min(triton.cdiv(2 * self.sm_count(device), tiles), triton.cdiv(depth, 64)))
        warps = 8 if bm >= 64 else 4  # with 4 warps the 64x64 tile spilled on sm_80 under triton 3.6
        return TileConfig(bm, 64, 64, split, warps, 4)


DEFAULT = KernelConfig()


@cache
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as TF32 by default; PyTorch's fp32 matmul (our reference) is IEEE.
    return "ieee" if dtype == torch.float32 else "tf32"


def r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16
