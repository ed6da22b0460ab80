"""Quantization-aware LoRA initialisations, computed from a layer's full-precision weight W [out, in]
while the base loads, before (or as) W is quantized.

    zeros  QLoRA and PEFT's default: A kaiming-uniform, B = 0; base Q = nf4(W). The adapter starts at
           zero and leaves the quantization error E = W - deq(Q) to training.
    loftq  LoftQ, one alternating step (Li et al. 2023, https://arxiv.org/abs/2310.08659): scale · B A =
           the best rank-r approximation of E (truncated SVD, Eckart-Young); base Q = nf4(W), unchanged,
           so the adapter is a plain LoRA of the ordinary 4-bit base. `loftq:N`: E's top-r triplets from a
           randomized SVD with N subspace iterations.
    pissa  PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): scale · B A = the top-r singular
           part of W; base Q = nf4(W - scale · B A) (QPiSSA). `pissa:N`: the top-r triplets from a
           randomized SVD with N subspace iterations (torch.svd_lowrank, Halko et al. 2011), for large layers.
    olora  OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): W = Q R (thin QR), B = Q[:, :r],
           A = R[:r]; base Q = nf4(W - scale · B A).

The factors are PEFT's (peft/tuners/lora/layer.py `pissa_init`, `olora_init`), in fp32, so the same W gives
the same factors to 1e-5; they are computed without a full decomposition of W (top_singular, olora_factors:
the exact top-r part of an SVD or QR costs a fraction of the whole). PiSSA divides the singular values by
the scale and splits them as sqrt(S) on each side, and our LoftQ does the same (PEFT's one-step
`replace_lora_weights_loftq` does not divide, which is right only at alpha = r).

pissa and olora change the base; the adapter they train is only meaningful over that residual base. A
layer keeps its initial factors (A0, B0) and the saved adapter is PEFT's conversion to a plain LoRA of
the ordinary base (minilora/adapter.py): scale · B A - scale · B0 A0 = scale · [B, -B0] [A; A0].
"""

from contextlib import contextmanager

import torch

from minilora.recipe import BASE_CHANGING_INITS as BASE_CHANGING
from minilora.recipe import parse_init

ZEROS, LOFTQ, PISSA, OLORA = "zeros", "loftq", "pissa", "olora"


def changes_base(init: str) -> bool:
    """Whether the init quantizes W - scale · B0 A0 instead of W (so its adapter is saved converted)."""
    return parse_init(init)[0] in BASE_CHANGING


def split_spectrum(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scale · B A = u diag(s) vh: sqrt(s / scale) on each side (PEFT's PiSSA)."""
    root = torch.sqrt(s / scale)  # (r,)
    return torch.diag(root) @ vh, u @ torch.diag(root)


def top_singular(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-r singular triplets (u [out, r], s [r], vh [r, in]) of w, exact, in fp32.

    From the eigendecomposition of the Gram matrix of w's smaller side, formed and solved in float64, not from
    a full SVD: a LAPACK SVD of a 1376 x 256 matrix costs 2 to 4 times the 256 x 256 eigh on one CPU core, and
    only r of the triplets are used. Squaring w squares its condition number, which float64 absorbs: the
    eigenvalues carry an absolute error of about 1e-16 * s_1^2, so s_i is exact to fp32 precision unless
    s_i / s_1 < 1e-4, far below any component a rank-r adapter keeps. Each singular vector is unique up to its
    sign (and, for tied singular values, up to a rotation within their span), as an SVD's is."""
    wide = w.shape[0] < w.shape[1]
    m = (w.T if wide else w).to(torch.float64)  # (long, short)
    eigenvalues, eigenvectors = torch.linalg.eigh(m.T @ m)  # ascending
    lam = eigenvalues.flip(0)[:r].clamp_min(0)
    v = eigenvectors.flip(1)[:, :r]  # (short, r): right singular vectors of m
    s = lam.sqrt()
    # u_i = m v_i / s_i; a zero singular value (a rank-deficient w) has no defined u_i, and scale · B A
    # does not see it (s_i = 0), so it is left zero.
    u = torch.where(s > 0, (m @ v) / torch.where(s > 0, s, 1), 0)  # (long, r)
    if wide:
        u, v = v, u
    return u.to(torch.float32), s.to(torch.float32), v.T.to(torch.float32).contiguous()


def top_r(w: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [out, r], s [r], vh [r, in]) of fp32 `w`: exact (top_singular), or from torch.svd_lowrank with `niter`
    subspace iterations (`pissa:N`, `loftq:N`)."""
    if niter is None:
        return top_singular(w, r)
    u, s, v = torch.svd_lowrank(w, r, niter=niter)
    return u, s, v.T


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of W (fp32): exact (top_singular), or torch.svd_lowrank with `niter` iterations.
    The randomized SVD draws its test matrix from torch's global generator (seeded by the run)."""
    return split_spectrum(*top_r(weight.to(torch.float32), r, niter), scale)  # W: (out, in)


def olora_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = R[:r] [r, in], B = Q[:, :r] [out, r] of W's thin QR (fp32). Unlike PiSSA, PEFT does not divide
    by the scale here: scale · B A = scale · (the first r columns' part of W).

    Householder QR reduces the columns left to right, so Q[:, :r] and the top-left R[:r, :r] are those of the QR
    of W's first r columns alone, and R[:r] = Q[:, :r]^T W: an (out, r) factorization and one product instead of
    the whole QR (18 ms -> under 1 ms for a 1376 x 256 W on one CPU core)."""
    w = weight.to(torch.float32)  # (out, in), r <= min(out, in) (add_lora refuses a larger rank)
    q, head = torch.linalg.qr(w[:, :r])  # (out, r), (r, r) upper triangular
    a = q.T @ w  # (r, in)
    a[:, :r] = head  # exactly triangular, as the whole QR's R is (the product leaves ~1e-7 below the diagonal)
    return a, q.contiguous()


def loftq_factors(weight: torch.Tensor, dequantized: torch.Tensor, r: int, scale: float,
                  niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scale · B A = the best rank-r approximation of E = W - deq(Q): E's exact top-r singular part
    (top_singular), or with `niter` a randomized SVD's (`loftq:N`, for large layers; close to the best only
    where E's spectrum decays past r, e.g. the error of outlier-dominated blocks)."""
    error = weight.to(torch.float32) - dequantized.to(torch.float32)  # (out, in)
    return split_spectrum(*top_r(error, r, niter), scale)


def subtract_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W - scale · B A, formed in fp32 and rounded once to W's dtype: the residual a base-changing init
    quantizes. One function for the load and for anything that must rebuild that base bit for bit."""
    return torch.addmm(weight.to(torch.float32), b, a, alpha=-scale).to(weight.dtype)  # one pass over W


@contextmanager
def one_cpu_thread(device: torch.device):
    """On a CPU, run the load's per-target work (quantization, an init's factorization and residual) on one
    intra-op thread: MKL's threaded kernels spin at their barriers when the cores are shared. Measured on a
    2-core CPU at load average 7 to 12: an SVD of a 1536 x 256 matrix took 0.14 to 9 s on 2 threads and
    0.02 to 0.03 s on 1; W - scale · B A for a 1376 x 256 W 24 ms and 0.2 ms. A GPU is left as it is."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def initial_factors(weight: torch.Tensor, init: str, r: int, scale: float,
                    dequantized: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, in], B0 [out, r]) fp32 for a non-zeros `init`; `dequantized` (deq(nf4(W))) only for loftq."""
    method, niter = parse_init(init)
    if method == PISSA:
        return pissa_factors(weight, r, scale, niter)
    if method == OLORA:
        return olora_factors(weight, r, scale)
    if method == LOFTQ:
        if dequantized is None:
            raise ValueError("loftq fits the 4-bit quantization error: it needs the dequantized base")
        return loftq_factors(weight, dequantized, r, scale, niter)
    raise ValueError(f"init {init!r} has no computed factors")
