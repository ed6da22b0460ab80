"""Dequantize bitsandbytes 4-bit weights (NF4, FP4) in Triton, bit-exact with bitsandbytes.

The layout, read from bitsandbytes 0.50 (`functional.quantize_4bit`, `backends/*/ops.py`):

    W (N, K) is flattened row-major; flat element e = n*K + k
    packed uint8 [(N*K+1)//2]: element 2j in the HIGH nibble of byte j, element 2j+1 in the low nibble
    one absmax per `blocksize` consecutive flat elements: block b = e // blocksize
    plain:        absmax[b] is fp32
    double quant: absmax[b] = code2[q[b]] * absmax2[b // blocksize2] + offset   (q uint8, fp32 math)
    value:        W[e] = round_to_dtype(code[nibble(e)] * absmax[e // blocksize])   (fp32 product)

bitsandbytes rebuilds the double-quantized absmax with a multiply (its blockwise dequant kernel) and a
separate add (`absmax += offset`). Fused into one FMA the sum is rounded once instead of twice and the
last bit can differ, so kernels that rebuild it are launched with `enable_fp_fusion=False`.

Tiles are loaded a group of absmax at a time (not one absmax per element): a tile of BK columns
holds BK // blocksize whole blocks per row when BK > blocksize, else lies inside one block per row.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# bitsandbytes' 4-bit quant types; both are a 16-entry table lookup (`quant_state.code`).
QUANT_TYPES = ("nf4", "fp4")
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Packed4bit:
    """The tensors of one 4-bit weight, as the kernels read them (no copies of the weight)."""

    data: torch.Tensor  # uint8 [(N*K+1)//2], the packed codes
    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] with double quant
    code: torch.Tensor  # fp32 [16], the NF4/FP4 table
    absmax2: torch.Tensor  # fp32 [ceil(blocks / blocksize2)] (double quant; else a dummy = absmax)
    code2: torch.Tensor  # fp32 [256] signed dynamic map (double quant; else a dummy = code)
    offset: torch.Tensor  # fp32 0-dim (double quant; else a dummy = code)
    nested: bool
    blocksize: int
    blocksize2: int
    n: int  # out features
    k: int  # in features

    @property
    def launch_options(self) -> dict:
        # Only the double-quant absmax has a multiply followed by an add that FMA would contract.
        return {"enable_fp_fusion": not self.nested}


def pack_state(packed: torch.Tensor, quant_state) -> Packed4bit:
    """Read a bitsandbytes (packed, QuantState) pair; raises ValueError for layouts we do not read."""
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("cpu weights repacked by bitsandbytes (packing_format_for_cpu)")
    if quant_state.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_state.quant_type!r} not supported")
    shape = tuple(quant_state.shape or ())
    if len(shape) != 2:
        raise ValueError(f"weight shape {shape} is not 2-D")
    bs = int(quant_state.blocksize)
    if bs < 2 or bs & (bs - 1):
        raise ValueError(f"blocksize {bs} is not a power of two")
    n, k = shape
    # quant_storage may be any dtype (FSDP uses bf16); the bytes are what matter.
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    if data.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed weight has {data.numel()} bytes, expected {(n * k + 1) // 2}")
    code = quant_state.code.to(torch.float32)
    if quant_state.nested:
        s2 = quant_state.state2
        bs2 = int(s2.blocksize)
        if bs2 < 1 or bs2 & (bs2 - 1):
            raise ValueError(f"nested blocksize {bs2} is not a power of two")
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), device=data.device)
        return Packed4bit(data, quant_state.absmax, code, s2.absmax.to(torch.float32),
                          s2.code.to(torch.float32), offset.to(torch.float32).reshape(()), True,
                          bs, bs2, n, k)
    return Packed4bit(data, quant_state.absmax.to(torch.float32), code, code, code, code, False,
                      bs, 1, n, k)


@triton.jit
def block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask,
                 BS2: tl.constexpr, NESTED: tl.constexpr):
    """absmax of quantization blocks `blk` (any shape) in fp32; 0 where `mask` is false.

    NESTED: absmax = code2[q[blk]] * absmax2[blk // BS2] + offset, a multiply then an add, as
    bitsandbytes computes it (the launch disables FMA contraction).
    """
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scaled = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0)
        return scaled + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def fp32_to_bf16_rtne(x):
    """Round fp32 to bf16, to nearest even, with integer ops.

    Triton's interpreter truncates fp32 -> bf16 casts, while the GPU rounds to nearest even; integer
    rounding gives the GPU's (and bitsandbytes') answer on both, so the CPU test pins the GPU result.
    """
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)  # keep NaN a NaN (the carry could turn it into inf)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def load_w_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                offs_n, k0, N, K,
                BN: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                NESTED: tl.constexpr):
    """W[offs_n, k0 : k0+BK] in fp32, shape (BN, BK); zeros outside N and K.

    Needs K % BS == 0 (a quantization block never straddles rows) and k0 % BK == 0. Reads BK/2 bytes
    per row: high nibbles are the even columns, low nibbles the odd ones, interleaved back in order.
    """
    offs_b = k0 // 2 + tl.arange(0, BK // 2)  # (BK/2,) byte column
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    byte = tl.load(w_ptr + rows[:, None] * (K // 2) + offs_b[None, :],
                   mask=mask_n[:, None] & (offs_b < K // 2)[None, :], other=0)  # (BN, BK/2) uint8
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32))
    lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32))
    vals = tl.interleave(hi, lo)  # (BN, BK) fp32 code values
    blocks_per_row = K // BS
    if BK > BS:
        G: tl.constexpr = BK // BS
        offs_g = k0 // BS + tl.arange(0, G)  # (G,) block column
        blk = rows[:, None] * blocks_per_row + offs_g[None, :]  # (BN, G)
        am = block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk,
                          mask_n[:, None] & (offs_g < blocks_per_row)[None, :], BS2, NESTED)
        w = tl.reshape(tl.reshape(vals, (BN, G, BS)) * am[:, :, None], (BN, BK))
    else:
        blk = rows * blocks_per_row + k0 // BS  # (BN,): the tile lies inside one block per row
        am = block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask_n, BS2, NESTED)
        w = vals * am[:, None]
    return w


@triton.jit
def _dequant_kernel(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, numel,
                    BLOCK: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
                    OUT_BF16: tl.constexpr):
    """out[e] = round(code[nibble(e)] * absmax[e // BS]) for the flat elements of one program.

    BLOCK (elements per program) is a multiple of BS, so a program holds BLOCK // BS whole blocks
    and loads each absmax once. Works for any N, K (blocks may straddle rows; a partial last block).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    byte = tl.load(w_ptr + offs_b, mask=offs_b < (numel + 1) // 2, other=0)
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32))
    lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32))
    vals = tl.interleave(hi, lo)  # (BLOCK,)
    G: tl.constexpr = BLOCK // BS
    blk = pid * G + tl.arange(0, G)
    am = block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, blk < (numel + BS - 1) // BS,
                      BS2, NESTED)
    w = tl.reshape(tl.reshape(vals, (G, BS)) * am[:, None], (BLOCK,))
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if OUT_BF16:
        w = fp32_to_bf16_rtne(w)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=offs < numel)


def dequantize_packed(pk: Packed4bit, dtype: torch.dtype, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """W as a (N, K) tensor of `dtype`, each value rounded once from its fp32 product.

    `block` elements per program (a power of two; raised to the quantization blocksize if smaller) and
    `num_warps` are launch sizes: `python -m benchmarks.kernels` sweeps them against bitsandbytes.
    """
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dequantize to {dtype}: expected float16, bfloat16 or float32")
    if block & (block - 1):
        raise ValueError(f"block {block} is not a power of two")
    out = torch.empty(pk.n, pk.k, dtype=dtype, device=pk.data.device)
    numel = out.numel()
    if numel == 0:
        return out
    block = max(block, pk.blocksize)
    _dequant_kernel[(triton.cdiv(numel, block),)](
        pk.data, pk.absmax, pk.absmax2, pk.code2, pk.offset, pk.code, out, numel,
        BLOCK=block, BS=pk.blocksize, BS2=pk.blocksize2, NESTED=pk.nested,
        OUT_BF16=dtype == torch.bfloat16, num_warps=num_warps, **pk.launch_options,
    )
    return out


def dequantize_4bit(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit(packed, quant_state)` in Triton, as a (N, K) tensor of `dtype`.

    Equal bit for bit to bitsandbytes when `dtype == quant_state.dtype`; for another dtype each value
    is rounded once from fp32 (bitsandbytes would round to quant_state.dtype first).
    """
    return dequantize_packed(pack_state(packed, quant_state), dtype)


def interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors).

    Triton reads the variable when `@triton.jit` runs, i.e. when this module is first imported.
    """
    return not isinstance(_dequant_kernel, triton.runtime.JITFunction)
