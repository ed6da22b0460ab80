"""A LoRA linear layer over a 4-bit (NF4/FP4) bitsandbytes weight, with dequant fused into the GEMMs.

    forward   Y  = X @ W^T + bias + S @ (s B)^T,     S = dropout(X) @ A^T            (M, r)
    backward  dX = dY @ W + dropout'(G @ A),          G = s dY @ B                    (M, r)
              dA = G^T @ dropout(X)     dB = s dY^T @ S     dbias = sum_rows dY

X (M, K), W (N, K) packed 4-bit, A (r, K), B (N, r), s = alpha / r. The rank-r products S and G are
small cuBLAS GEMMs; the big GEMMs (X W^T and dY W) read W as packed bytes and dequantize tile by tile
in the main loop, and start their accumulator at the LoRA term instead of adding it afterwards
(LoRAFusion's idea). No full-precision W is kept between forward and backward.

The GEMMs dispatch on M, the number of rows, to split-K, tiled or dequant + cuBLAS: tiles.py.

Dropout is the caller's (`dropout`, a function of the LoRA input; minilora passes its LoRA layer's law) and
runs on the host outside the autograd Function, on the input the PyTorch path drops out (same RNG stream, same
masks); its backward is PyTorch's. Without dropout, dX is one fused
kernel (base + LoRA); with dropout, the kernel computes the base part and the LoRA part G @ A goes
back through dropout's own backward.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .nf4 import Packed4bit, dequantize_packed, load_w_tile
from .support import packed_for
from .tiles import DEFAULT, KernelConfig, dot_precision, r_pad

Dropout = Callable[[torch.Tensor], torch.Tensor]  # the LoRA branch's dropout: input -> dropped-out input

# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _tile_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, col tile), GROUP_M row tiles at a time so W tiles are reused in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _rank_r_seed(acc, left_ptr, stride_left, rows, mask_m, right_ptr, offs_c, mask_c, stride_rr, stride_rc, R,
                 scale, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + left (BM, R) @ (scale * right) (R, C): the LoRA term a GEMM's accumulator starts from.

    left is S or G in the activations' dtype (row stride `stride_left`); right is fp32 LoRA weights
    read at right_ptr + r * stride_rr + c * stride_rc, scaled and rounded once to the left's dtype.
    """
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    left = tl.load(left_ptr + rows[:, None] * stride_left + offs_r[None, :],
                   mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # (BM, R_PAD)
    right = tl.load(right_ptr + offs_r[:, None].to(tl.int64) * stride_rr + offs_c[None, :].to(tl.int64) * stride_rc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)  # (R_PAD, C) fp32
    return tl.dot(left, (right * scale).to(left_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                s_ptr, b_ptr, bias_ptr, out_ptr,
                M, N, K, R, scale, k_per_split,
                stride_xm, stride_xk, stride_sm, stride_om,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr,
                BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, HAS_LORA: tl.constexpr,
                HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                GROUP_M: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] W[n, k] + sum_r S[m, r] (scale B[n, r]) + bias[n].

    Program (tile, split) sums k over [split * k_per_split, (split+1) * k_per_split). W tiles are
    dequantized to fp32, rounded once to X's dtype (exactly bitsandbytes' dequantized weight) and fed
    to tl.dot with fp32 accumulation. The accumulator starts at the LoRA term (split 0 only).
    PARTIAL: write fp32 partial sums to out[split] (M, N); the reduce kernel adds them and the bias.
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    dt = x_ptr.dtype.element_ty

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_LORA:
        if split == 0:  # B^T (r, n) sits at b_ptr + n * R + r
            acc = _rank_r_seed(acc, s_ptr, stride_sm, rows, mask_m, b_ptr, offs_n, mask_n, 1, R, R, scale,
                               R_PAD, DOT_PRECISION)

    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)  # (BM, BK)
        w = load_w_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                        offs_n, k0, N, K, BN, BK, BS, BS2, NESTED)  # (BN, BK) fp32
        acc = tl.dot(x, tl.trans(w.to(dt)), acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        out = out_ptr + split.to(tl.int64) * M * N + rows[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_kernel(dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
               g_ptr, a_ptr, out_ptr,
               M, N, K, R, n_per_split,
               stride_dym, stride_dyn, stride_gm, stride_om,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr,
               BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, HAS_LORA: tl.constexpr,
               PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr):
    """dX[m, k] = sum_n dY[m, n] W[n, k] + sum_r G[m, r] A[r, k].

    The same W tiles as the forward, read along the other axis: the output tile is (BM, BK) and the
    reduction walks n in steps of BN over [split * n_per_split, (split+1) * n_per_split).
    """
    pid_m, pid_k = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(K, BK), GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    k0 = pid_k * BK
    offs_k = k0 + tl.arange(0, BK)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows = offs_m.to(tl.int64)
    dt = dy_ptr.dtype.element_ty

    acc = tl.zeros((BM, BK), dtype=tl.float32)
    if HAS_LORA:
        if split == 0:  # A (r, k) sits at a_ptr + r * K + k
            acc = _rank_r_seed(acc, g_ptr, stride_gm, rows, mask_m, a_ptr, offs_k, mask_k, K, 1, R, 1.0,
                               R_PAD, DOT_PRECISION)

    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & (offs_n < N)[None, :], other=0.0)  # (BM, BN)
        w = load_w_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                        offs_n, k0, N, K, BN, BK, BS, BS2, NESTED)  # (BN, BK) fp32
        acc = tl.dot(dy, w.to(dt), acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_k[None, :]
    if PARTIAL:
        out = out_ptr + split.to(tl.int64) * M * K + rows[:, None] * K + offs_k[None, :]
        tl.store(out, acc, mask=mask)
    else:
        tl.store(out_ptr + rows[:, None] * stride_om + offs_k[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, numel, ncols, SPLIT,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_s ws[s, i] (+ bias[i % ncols]), summed in a fixed order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs  # int64 offsets: SPLIT * numel may pass 2**31
    for _ in range(SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % ncols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Host launchers
# ------------------------------------------------------------------------------------------------

def _reduce(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    numel, block = out.numel(), 1024
    _splitk_reduce_kernel[(triton.cdiv(numel, block),)](
        ws, bias if bias is not None else ws, out, numel, out.shape[1], ws.shape[0],
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, enable_fp_fusion=False)


def base_lora_forward(x: torch.Tensor, pk: Packed4bit, s: torch.Tensor | None, lora_B: torch.Tensor | None,
                      scale: float, bias: torch.Tensor | None, branch: str | None = None,
                      config: KernelConfig = DEFAULT) -> torch.Tensor:
    """Y (M, N) = x (M, K) @ W^T + s (M, r) @ (scale lora_B (N, r))^T + bias, in x's dtype.

    `s` None: no LoRA term. `bias` must already be in x's dtype. `branch` forces a dispatch branch.
    """
    m, k = x.shape
    n = pk.n
    branch = branch or config.branch_for(m, x.dtype)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if branch == "dequant":
        w = dequantize_packed(pk, x.dtype)  # (N, K), freed on return
        seed = bias  # (N,) broadcast by addmm, or None
        if s is not None:
            seed = s @ (lora_B * scale).to(x.dtype).t()  # (M, N)
            if bias is not None:
                seed += bias
        return torch.mm(x, w.t(), out=out) if seed is None else torch.addmm(seed, x, w.t(), out=out)

    cfg = config.fwd_config(branch, m, n, k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.bk), cfg.split) * cfg.bk
    split = triton.cdiv(k, k_per_split)  # no empty splits
    partial = split > 1
    target = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if partial else out
    r = 0 if s is None else s.shape[1]
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), split)
    _fwd_kernel[grid](
        x, pk.data, pk.absmax, pk.absmax2, pk.code2, pk.offset, pk.code,
        s if s is not None else x, lora_B if lora_B is not None else x, bias if bias is not None else x,
        target, m, n, k, r, float(scale), k_per_split,
        x.stride(0), x.stride(1), s.stride(0) if s is not None else 0, out.stride(0),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, R_PAD=r_pad(r), BS=pk.blocksize, BS2=pk.blocksize2,
        NESTED=pk.nested, HAS_LORA=s is not None, HAS_BIAS=bias is not None, PARTIAL=partial,
        DOT_PRECISION=dot_precision(x.dtype), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pk.launch_options,
    )
    if partial:
        _reduce(target, bias, out)
    return out


def base_lora_dx(dy: torch.Tensor, pk: Packed4bit, g: torch.Tensor | None, lora_A: torch.Tensor | None,
                 branch: str | None = None, config: KernelConfig = DEFAULT) -> torch.Tensor:
    """dX (M, K) = dy (M, N) @ W + g (M, r) @ lora_A (r, K), in dy's dtype (`g` None: base only)."""
    m, n = dy.shape
    k = pk.k
    branch = branch or config.branch_for(m, dy.dtype)
    out = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    if m == 0:
        return out
    if branch == "dequant":
        w = dequantize_packed(pk, dy.dtype)  # (N, K)
        if g is None:
            return torch.mm(dy, w, out=out)
        return torch.addmm(g @ lora_A.to(dy.dtype), dy, w, out=out)

    cfg = config.dx_config(branch, m, n, k, dy.device)
    n_per_split = triton.cdiv(triton.cdiv(n, cfg.bn), cfg.split) * cfg.bn
    split = triton.cdiv(n, n_per_split)
    partial = split > 1
    target = torch.empty(split, m, k, dtype=torch.float32, device=dy.device) if partial else out
    r = 0 if g is None else g.shape[1]
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(k, cfg.bk), split)
    _dx_kernel[grid](
        dy, pk.data, pk.absmax, pk.absmax2, pk.code2, pk.offset, pk.code,
        g if g is not None else dy, lora_A if lora_A is not None else dy, target,
        m, n, k, r, n_per_split,
        dy.stride(0), dy.stride(1), g.stride(0) if g is not None else 0, out.stride(0),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, R_PAD=r_pad(r), BS=pk.blocksize, BS2=pk.blocksize2,
        NESTED=pk.nested, HAS_LORA=g is not None, PARTIAL=partial,
        DOT_PRECISION=dot_precision(dy.dtype), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pk.launch_options,
    )
    if partial:
        _reduce(target, None, out)
    return out


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------

class LoRALinear4bitFunction(torch.autograd.Function):
    """Y = X W^T + bias + scale (Xd A^T) B^T, Xd = dropout(X) computed by the caller (None: Xd = X).

    Saves for backward: Xd (X itself without dropout: no copy), S (M, r), lora_A, lora_B; the packed
    weight is referenced (it is a frozen parameter), never a full-precision W.
    """

    @staticmethod
    def forward(ctx, x, xd, lora_A, lora_B, bias, pk: Packed4bit, scale: float, config: KernelConfig):
        dt = x.dtype
        with torch.autocast(x.device.type, enabled=False):  # the small matmuls stay in x's dtype
            k = x.shape[-1]
            xl = (x if xd is None else xd).reshape(-1, k)  # (M, K) the LoRA input
            s = xl @ lora_A.to(dt).t()  # (M, r)
            y = base_lora_forward(x.reshape(-1, k), pk, s, lora_B, scale,
                                  None if bias is None else bias.to(dt), config=config)  # (M, N)
        ctx.save_for_backward(x if xd is None else xd, s, lora_A, lora_B)
        ctx.pk, ctx.scale, ctx.dropout, ctx.config = pk, scale, xd is not None, config
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], pk.n)

    @staticmethod
    def backward(ctx, dy):
        xl, s, lora_A, lora_B = ctx.saved_tensors
        need_x, need_xd, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        pk, scale = ctx.pk, ctx.scale
        dx = dxd = da = db = dbias = None
        with torch.autocast(dy.device.type, enabled=False):
            dt = xl.dtype
            dy2 = dy.reshape(-1, pk.n).to(dt)  # (M, N)
            xl2 = xl.reshape(-1, pk.k)  # (M, K)
            g = dy2 @ (lora_B * scale).to(dt)  # (M, r) = scale dY B
            if need_x:
                # Without dropout the LoRA part of dX joins the fused kernel; with it, it is dXd.
                fused = not ctx.dropout
                dx = base_lora_dx(dy2, pk, g if fused else None, lora_A if fused else None, config=ctx.config)
                dx = dx.reshape(xl.shape)
            if need_xd:
                dxd = (g @ lora_A.to(dt)).reshape(xl.shape)
            if need_a:
                da = (g.t() @ xl2).to(lora_A.dtype)  # (r, K)
            if need_b:
                db = ((dy2.t() @ s).to(torch.float32) * scale).to(lora_B.dtype)  # (N, r)
            if need_bias:
                dbias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dxd, da, db, dbias, None, None, None


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedLoRA4bit:
    """The fused path of one LoRA layer over one 4-bit weight, for inputs of one device and dtype.

    Built once by `prepare` (which checks that the kernels can compute the layer), then called on each
    forward with the layer's current bias and adapter weights: no checks on the way to the kernels.
    """

    packed: Packed4bit
    config: KernelConfig = DEFAULT

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scale: float, dropout: Dropout | None = None) -> torch.Tensor:
        xd = None if dropout is None else _dropped_out(x, dropout, lora_A.dtype)
        return LoRALinear4bitFunction.apply(x, xd, lora_A.contiguous(), lora_B.contiguous(), bias, self.packed,
                                            float(scale), self.config)


def prepare(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
            config: KernelConfig = DEFAULT) -> FusedLoRA4bit:
    """The fused path for inputs like `x` (device, dtype, features); ValueError with the reason when
    the kernels cannot compute this layer (the caller uses PyTorch)."""
    pk = packed_for(x, weight)
    if lora_A.shape[1] != pk.k or lora_B.shape[0] != pk.n or lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit a "
                         f"({pk.n}, {pk.k}) weight")
    return FusedLoRA4bit(pk, config)


def lora_linear_4bit(x: torch.Tensor, weight, bias: torch.Tensor | None, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scale: float, dropout: Dropout | None = None,
                     config: KernelConfig = DEFAULT) -> torch.Tensor:
    """y (..., N) = x W^T + bias + scale * B A dropout(x), in x's dtype, for x (..., K).

    `weight` is a bitsandbytes Params4bit (N, K); lora_A (r, K) and lora_B (N, r) are the fp32
    adapter weights (cast to x's dtype inside; their gradients come back in their own dtype). `dropout` is
    the LoRA branch's dropout as a function of its input, None when none is active (evaluation, p = 0).
    Checks its arguments on every call: a layer calls `prepare` once and keeps what it returns.
    """
    try:
        fused = prepare(x, weight, lora_A, lora_B, config)
    except ValueError as err:
        raise ValueError(f"lora_linear_4bit: {err}") from None
    return fused(x, bias, lora_A, lora_B, scale, dropout)


def _dropped_out(x: torch.Tensor, dropout: Dropout, lora_dtype: torch.dtype) -> torch.Tensor:
    """dropout(x) in x's dtype, drawn on the tensor minilora's PyTorch path drops out (lora.py).

    That path drops out x cast to the adapter dtype (fp32) unless autocast is on. The same law on the
    same dtype consumes the RNG stream the same way, so a Triton run gets the PyTorch run's masks (on
    CUDA, fused dropout's vector width depends on the dtype: a bf16 draw would give other masks).
    """
    if torch.is_autocast_enabled(x.device.type) or x.dtype == lora_dtype:
        return dropout(x)
    return dropout(x.to(lora_dtype)).to(x.dtype)
