"""Variable-length attention for padding-free rows on CUDA, with PyTorch's own flash kernel.

A padding-free row holds several examples back to back, marked by `position_ids` restarting at 0.
transformers' default path (sdpa) turns the restarts into a dense block-diagonal (T, T) mask and
computes attention over the whole row; `torch.nn.attention.varlen.varlen_attn` instead takes the
examples' boundaries (cumulative lengths) and computes each example's causal attention alone: no
mask in memory and no work across examples. It is registered as a transformers attention function,
so the model's own attention layers call it; anything it does not cover (no position ids, a cache,
attention dropout, an explicit mask) goes to transformers' sdpa function unchanged.

Rows are treated as sequences that end where the next one starts, so right-padded rows are also
exact: a causal example never looks at the padding after it.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "minilora_varlen"


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


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, Hq, T, D), key/value (B, Hkv, T, D) -> ((B, T, Hq, D), None), as transformers expects."""
    from torch.nn.attention.varlen import varlen_attn

    position_ids = kwargs.get("position_ids")
    batch, heads, width, dim = query.shape
    plain = position_ids is not None and position_ids.shape == (batch, width) and key.shape[2] == width
    if not plain or attention_mask is not None or dropout > 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu_seq, longest = _bounds.get(position_ids)
    flat = lambda t: t.transpose(1, 2).reshape(batch * width, t.shape[1], dim)  # (B*T, H, D)
    out = varlen_attn(flat(query), flat(key), flat(value), cu_seq, cu_seq, longest, longest, scale=scaling,
                      window_size=(-1, 0), enable_gqa=key.shape[1] != heads)  # (B*T, Hq, D), causal
    return out.view(batch, width, heads, dim), None


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Route `model`'s attention layers to the varlen kernel (call only where `varlen_available`)."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    model.config._attn_implementation = NAME
