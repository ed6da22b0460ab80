"""Quantization-aware LoRA initialisations, computed from a layer's full-precision weight W [out, in]
while the base loads, before (or as) W is quantized.

    zeros  QLoRA and PEFT's default: A kaiming-uniform, B = 0; base Q = nf4(W). The adapter starts at
           zero and leaves the quantization error E = W - deq(Q) to training.
    loftq  LoftQ, one alternating step (Li et al. 2023, https://arxiv.org/abs/2310.08659): scale · B A =
           the best rank-r approximation of E (truncated SVD, Eckart-Young); base Q = nf4(W), unchanged,
           so the adapter is a plain LoRA of the ordinary 4-bit base.
    pissa  PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): scale · B A = the top-r singular
           part of W; base Q = nf4(W - scale · B A) (QPiSSA). `pissa:N`: the top-r triplets from a
           randomized SVD with N subspace iterations (torch.svd_lowrank, Halko et al. 2011), for large layers.
    olora  OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): W = Q R (thin QR), B = Q[:, :r],
           A = R[:r]; base Q = nf4(W - scale · B A).

The arithmetic is PEFT's (peft/tuners/lora/layer.py `pissa_init`, `olora_init`) op for op, in fp32, so
the same W gives the same factors; PiSSA divides the singular values by the scale and splits them as
sqrt(S) on each side, and our LoftQ does the same (PEFT's one-step `replace_lora_weights_loftq` does not
divide, which is right only at alpha = r).

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


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of W (fp32): an exact SVD, or torch.svd_lowrank with `niter` iterations.
    The randomized SVD draws its test matrix from torch's global generator (seeded by the run)."""
    w = weight.to(torch.float32)  # (out, in)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return split_spectrum(u[:, :r], s[:r], vh[:r], scale)
    u, s, v = torch.svd_lowrank(w, r, niter=niter)
    return split_spectrum(u, s, v.T, scale)


def olora_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = R[:r] [r, in], B = Q[:, :r] [out, r] of W's thin QR (fp32). Unlike PiSSA, PEFT does not divide
    by the scale here: scale · B A = scale · (the first r columns' part of W)."""
    q, rr = torch.linalg.qr(weight.to(torch.float32))  # (out, k), (k, in), k = min(out, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def loftq_factors(weight: torch.Tensor, dequantized: torch.Tensor, r: int, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """scale · B A = the best rank-r approximation of E = W - deq(Q), from E's SVD in fp32."""
    error = weight.to(torch.float32) - dequantized.to(torch.float32)  # (out, in)
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    return split_spectrum(u[:, :r], s[:r], vh[:r], scale)


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
        return loftq_factors(weight, dequantized, r, scale)
    raise ValueError(f"init {init!r} has no computed factors")
