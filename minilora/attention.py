"""Attention for padding-free rows that costs what the examples cost, not what the row would.

A padding-free row holds several examples back to back, marked by `position_ids` restarting at 0.
transformers' default path (sdpa) turns the restarts into a dense block-diagonal (T, T) mask and
computes attention over the whole row: (sum of lengths)^2 work and memory where the examples need
the sum of their squares. This module registers an attention function with transformers (the
model's own attention layers call it) that computes each example's causal attention alone:

- on CUDA (Ampere or newer, fp16/bf16), with PyTorch's variable-length flash kernel
  (`torch.nn.attention.varlen.varlen_attn`), all examples in one launch;
- elsewhere, one `scaled_dot_product_attention(is_causal=True)` per example (a handful per layer).

It is used only for architectures whose attention layers pass `position_ids` on and need nothing
else (`SUPPORTED`), without attention dropout; other models keep transformers' mask path. With it,
transformers builds no mask at all, so a call without position ids is an error, not a fallback; a
call with a cache (generation) goes to transformers' sdpa function. Rows are treated as sequences
that end where the next one starts, so right-padded rows are exact too: a causal example never
looks at the padding after it.
A sliding window (Phi-3, Mistral: `sliding_window` attends to the last W positions) is applied.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "minilora_varlen"
# Model types whose attention layers hand position_ids (and sliding_window, if any) to the attention
# function and use no other attention feature (soft-capping, sinks, ...): checked in transformers 5.x.
SUPPORTED = frozenset({"phi3", "llama", "mistral", "qwen2", "gpt_neox"})


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch's varlen kernel: CUDA, fp16/bf16, Ampere or newer, and a torch that has it."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def sequence_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative sequence starts over the flattened rows, int32 (N+1,); longest sequence).

    A sequence starts at every position id 0 and at the start of every row."""
    batch, width = position_ids.shape
    starts = position_ids == 0  # (B, T)
    starts[:, 0] = True
    flat = torch.nonzero(starts.reshape(-1)).flatten()  # (N,)
    ends = torch.cat([flat, flat.new_tensor([batch * width])])
    lengths = ends[1:] - ends[:-1]
    return ends.to(torch.int32), int(lengths.max())


class _BoundsCache:
    """The layers of one forward share one position_ids tensor: compute its bounds (a host sync) once."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: tuple[torch.Tensor, int] | None = None

    def get(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.key is not position_ids:
            self.key, self.value = position_ids, sequence_bounds(position_ids)
        return self.value


_bounds = _BoundsCache()


def _per_sequence_attention(query, key, value, cu_seq: torch.Tensor, scaling, window: int | None):
    """query (N, Hq, D), key/value (N, Hkv, D) over flattened rows -> (N, Hq, D); sdpa per sequence."""
    outs = []
    bounds = cu_seq.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # (1, H, L, D): with a batch dimension PyTorch's CPU flash kernel runs (3-D inputs fall back to the
        # math path, which builds (L, L) scores and a mask: twice the time on CPU).
        q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # (1, H, L, D)
        n = end - start
        if window is not None and n > window:
            i = torch.arange(n, device=query.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)  # (L, L) causal, last W
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scaling,
                                               enable_gqa=k.shape[1] != q.shape[1])
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                               enable_gqa=k.shape[1] != q.shape[1])
        outs.append(o[0].transpose(0, 1))  # (L, Hq, D)
    return torch.cat(outs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, **kwargs):
    """query (B, Hq, T, D), key/value (B, Hkv, T, D) -> ((B, T, Hq, D), None), as transformers expects."""
    position_ids = kwargs.get("position_ids")
    batch, heads, width, dim = query.shape
    if key.shape[2] != width or attention_mask is not None:  # decoding with a cache: one sequence per row
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if position_ids is not None and position_ids.shape == (1, width) and batch > 1:
        position_ids = position_ids.expand(batch, width)  # transformers' default: the same positions per row
    if position_ids is None or position_ids.shape != (batch, width) or dropout > 0:
        raise RuntimeError(f"{NAME} attention needs (batch, length) position_ids and no attention dropout")
    cu_seq, longest = _bounds.get(position_ids)
    flat = lambda t: t.transpose(1, 2).reshape(batch * width, t.shape[1], dim)  # (B*T, H, D)
    q, k, v = flat(query), flat(key), flat(value)
    if varlen_available(query.device, query.dtype):
        from torch.nn.attention.varlen import varlen_attn

        left = sliding_window - 1 if sliding_window is not None and longest > sliding_window else -1
        out = varlen_attn(q, k, v, cu_seq, cu_seq, longest, longest, scale=scaling, window_size=(left, 0),
                          enable_gqa=k.shape[1] != heads)  # (B*T, Hq, D)
    else:
        out = _per_sequence_attention(q, k, v, cu_seq, scaling, sliding_window)
    return out.view(batch, width, heads, dim), None


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Route `model`'s attention layers to `varlen_attention_forward` (any device) where the
    architecture is `SUPPORTED` and has no attention dropout; returns whether it did."""
    config = model.config
    if config.model_type not in SUPPORTED or getattr(config, "attention_dropout", 0.0):
        return False
    AttentionInterface.register(NAME, varlen_attention_forward)
    config._attn_implementation = NAME
    return True
