"""4-bit base weights that FSDP2 (`torch.distributed.fsdp.fully_shard`) shards: packed bytes and statistics.

A bitsandbytes 4-bit weight is a `Params4bit` (packed codes, uint8 [(N*K+1)//2, 1]) plus its `quant_state`:
one absmax per block of 64 weights (uint8 codes with double quantization, else fp32), and with double
quantization one fp32 `state2.absmax` per group of 256 blocks, plus small tables (the 16-entry code,
the 256-entry nested code, the scalar offset). `make_4bit_shardable(model)` swaps every such weight for a
`ShardableParams4bit`: a Params4bit of the same bytes and the same quant_state (the model computes
exactly what it computed), which FSDP2 can shard through its all-gather extension
(`fsdp_pre_all_gather` / `fsdp_post_all_gather`, torch/distributed/fsdp/_fully_shard/_fsdp_param.py):

    whole weight (ShardableParams4bit)          rank r between forwards (NF4Shard, inside a DTensor)
    packed   [G groups x 32*256 bytes] ──┐      packed  [g, 8192] uint8    groups r*g .. r*g+g-1
    absmax   [G x 256] uint8 / fp32    ──┼───►  absmax  [g, 256]           (zero padding past G)
    absmax2  [G] fp32 (double quant)   ──┘      absmax2 [g] fp32           g = ceil(G / world)
    code, code2, offset                  ────►  kept whole on every rank (16 + 256 floats + 1)

The unit of sharding is a group of 256 blocks (16,384 weights; 1 block without double quantization), so
a block's codes, its absmax and its group's nested absmax always lie on the same rank. FSDP all-gathers
the three parts of every shard (as bytes: its all-gather concatenates inputs of mixed dtypes as uint8,
_fsdp_collectives.py), and `fsdp_post_all_gather` returns a ShardableParams4bit whose data and
quant_state tensors are views of the gathered buffers, trimmed to the layer's real size: the bytes
bitsandbytes, LoRALinear, DoRALinear and the fused kernels read without FSDP, with no copy. Nothing is
reinterpreted as a float type: FSDP-QLoRA's usual route stores the codes as bf16 (`quant_storage=bf16`),
and FSDP2 canonicalizes bf16 NaN bit patterns, corrupting about 0.1% of packed bytes
(https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1945).

FSDP2 chunks a parameter along dim 0 of its logical shape, here the Params4bit's [(N*K+1)//2, 1], and
only does its own padding for plain tensors: an extension whose chunk is shorter than the first must
all-gather inputs of the first chunk's size. So every shard reports the same logical size, the first
chunk's [ceil(n_bytes / world), 1], whatever the world size; what it holds is its groups. (That size is
FSDP's bookkeeping only: a shard supports no DTensor operation beyond what FSDP2 does to it, and any other
raises rather than reading the groups as bytes of a [n_bytes, 1] tensor.)
"""

import math
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn

from minilora.errors import UserError

aten = torch.ops.aten
UNNESTED_GROUP_BLOCKS = 1  # without double quantization every block is self-contained


@dataclass(frozen=True, eq=False)
class NF4Layout:
    """One 4-bit weight's geometry and the small tables every rank keeps whole."""

    shape: torch.Size  # (N, K), the weight's logical shape
    dtype: torch.dtype  # quant_state.dtype: what the weight dequantizes to
    quant_type: str  # "nf4" or "fp4"
    blocksize: int  # weights per absmax (64)
    n_bytes: int  # packed bytes, (N*K+1)//2
    n_blocks: int  # absmax entries, ceil(N*K / blocksize)
    group_blocks: int  # blocks per unit of sharding: state2's blocksize (256), or 1
    code: torch.Tensor  # fp32 [16], the 4-bit table
    absmax_dtype: torch.dtype  # uint8 with double quantization, else fp32
    nested: bool
    code2: torch.Tensor | None  # fp32 [256], the nested 8-bit map
    offset: torch.Tensor | None  # fp32 0-dim, the mean the nested absmax was centered on
    blocksize2: int | None

    @classmethod
    def of(cls, weight) -> "NF4Layout":
        qs = weight.quant_state
        if weight.dtype != torch.uint8:
            # A float storage dtype is the route that loses NaN-pattern bytes; we shard bytes as bytes.
            raise UserError(f"a 4-bit weight stored as {weight.dtype} cannot be sharded; quantize with "
                            "quant_storage=torch.uint8 (minilora.load_base does)")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("a 4-bit weight repacked by bitsandbytes for the CPU cannot be sharded")
        n_weights = math.prod(qs.shape)
        n_blocks = math.ceil(n_weights / qs.blocksize)
        nested = qs.nested
        return cls(shape=torch.Size(qs.shape), dtype=qs.dtype, quant_type=qs.quant_type, blocksize=qs.blocksize,
                   n_bytes=(n_weights + 1) // 2, n_blocks=n_blocks,
                   group_blocks=qs.state2.blocksize if nested else UNNESTED_GROUP_BLOCKS, code=qs.code,
                   absmax_dtype=qs.absmax.dtype, nested=nested, code2=qs.state2.code if nested else None,
                   offset=qs.offset if nested else None, blocksize2=qs.state2.blocksize if nested else None)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.n_blocks / self.group_blocks)

    @property
    def group_bytes(self) -> int:
        return self.group_blocks * self.blocksize // 2

    def groups_per_shard(self, n_shards: int) -> int:
        return math.ceil(self.n_groups / n_shards)

    def table_bytes(self) -> int:
        """Bytes of the tables every rank keeps whole."""
        tables = [self.code] + ([self.code2, self.offset] if self.nested else [])
        return sum(t.numel() * t.element_size() for t in tables)

    def whole_bytes(self) -> int:
        """Bytes of the unsharded weight: packed codes, absmax, nested absmax and tables."""
        absmax = self.n_blocks * self.absmax_dtype.itemsize
        return self.n_bytes + absmax + (4 * self.n_groups if self.nested else 0) + self.table_bytes()

    def group_parts(self) -> list[tuple[int, torch.dtype]]:
        """(entries per group, dtype) of each part of a shard: packed codes, absmax, nested absmax."""
        parts = [(self.group_bytes, torch.uint8), (self.group_blocks, self.absmax_dtype)]
        return parts + ([(1, torch.float32)] if self.nested else [])

    def one_buffer_bytes_per_group(self) -> int:
        return sum(n * dtype.itemsize for n, dtype in self.group_parts())

    def shard_size(self, n_shards: int) -> torch.Size:
        """The logical size of each of `n_shards` shards: torch.chunk's first chunk of [n_bytes, 1]."""
        return torch.Size([math.ceil(self.n_bytes / n_shards), 1])

    def is_shard_size(self, size: torch.Size) -> bool:
        """Whether `size` is shard_size(n) for some number of shards n."""
        return (len(size) == 2 and size[1] == 1 and 0 < size[0] <= self.n_bytes
                and self.shard_size(math.ceil(self.n_bytes / size[0])) == size)

    def quant_state(self, absmax: torch.Tensor, absmax2: torch.Tensor | None) -> QuantState:
        """A bitsandbytes QuantState over whole (gathered) statistics."""
        state2 = None
        if self.nested:
            state2 = QuantState(absmax=absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return QuantState(absmax=absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=self.offset, state2=state2)


def _grouped(flat: torch.Tensor, n_rows: int, row: int) -> torch.Tensor:
    """`flat` (1-D) zero-padded to n_rows * row entries, as [n_rows, row] (a copy)."""
    out = flat.new_zeros(n_rows * row)
    out[:flat.numel()] = flat
    return out.view(n_rows, row)


class ShardableParams4bit(bnb.nn.Params4bit):
    """A Params4bit that FSDP2 can shard: the same bytes and quant_state, read the same way by every
    consumer of a Params4bit. Also what FSDP puts back on the module for forward and backward, built
    over its all-gather buffers (`NF4Shard.fsdp_post_all_gather`)."""

    @classmethod
    def wrap(cls, weight: bnb.nn.Params4bit) -> "ShardableParams4bit":
        """The same tensors as `weight` (no copy), as a ShardableParams4bit."""
        return cls(weight.data, requires_grad=False, quant_state=weight.quant_state, blocksize=weight.blocksize,
                   compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                   quant_storage=weight.quant_storage, module=weight.module, bnb_quantized=weight.bnb_quantized)

    def _alias(self) -> "ShardableParams4bit":
        return type(self).wrap(self)

    def shards(self, n_shards: int) -> list["NF4Shard"]:
        """The weight cut into `n_shards` NF4Shards of equal group counts (the last ones zero-padded) and
        equal logical sizes."""
        layout = NF4Layout.of(self)
        size, g = layout.shard_size(n_shards), layout.groups_per_shard(n_shards)
        qs = self.quant_state
        packed = _grouped(self.data.reshape(-1), n_shards * g, layout.group_bytes)  # (shards*g, group_bytes)
        absmax = _grouped(qs.absmax.reshape(-1), n_shards * g, layout.group_blocks)  # (shards*g, group_blocks)
        absmax2 = _grouped(qs.state2.absmax.reshape(-1), n_shards * g, 1).view(-1) if layout.nested else None
        return [NF4Shard(layout, size, packed[i * g:(i + 1) * g], absmax[i * g:(i + 1) * g],
                         None if absmax2 is None else absmax2[i * g:(i + 1) * g]) for i in range(n_shards)]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # What fully_shard asks of the parameter it shards (_fsdp_param.py, _init_sharded_param):
        # torch.chunk along dim 0, then new_zeros of a chunk's size to hold this rank's padded shard.
        if func in (torch.chunk, torch.Tensor.chunk) and isinstance(args[0], cls):
            weight, n_shards = args[0], args[1] if len(args) > 1 else kwargs["chunks"]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            if dim != 0:
                raise ValueError(f"a 4-bit weight is sharded along dim 0, not {dim}")
            return weight.shards(n_shards)
        if func is torch.Tensor.new_zeros and isinstance(args[0], cls):
            layout, size = NF4Layout.of(args[0]), torch.Size(_size_arg(args, kwargs))
            if layout.is_shard_size(size):
                return NF4Shard.empty(layout, size, args[0].device)
        # What FSDP does to the unsharded parameter (init_unsharded_param): as_strided to the logical
        # size, then nn.Parameter(), which detaches. Both keep the quant_state.
        if func is torch.Tensor.detach and isinstance(args[0], cls):
            return args[0]._alias()
        if func is torch.as_strided and isinstance(args[0], cls):
            t = args[0]
            size, stride = tuple(args[1]), tuple(args[2])
            offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", t.storage_offset())
            if size == tuple(t.shape) and stride == t.stride() and offset == t.storage_offset():
                return t._alias()
        return super().__torch_function__(func, types, args, kwargs)


def _size_arg(args, kwargs) -> tuple[int, ...]:
    size = args[1:] if len(args) > 1 else kwargs["size"]
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    return tuple(size)


class NF4Shard(torch.Tensor):
    """One rank's groups of a 4-bit weight: what a DTensor of FSDP holds between forwards.

    Its logical size is the first chunk FSDP cuts from the Params4bit [n_bytes, 1], [ceil(n_bytes/world), 1];
    what it holds is `g` whole groups: packed [g, group_bytes] uint8, absmax [g, group_blocks] and, with
    double quantization, absmax2 [g] fp32. It supports only what FSDP2 does to a sharded parameter."""

    @staticmethod
    def __new__(cls, layout: NF4Layout, size: torch.Size, packed: torch.Tensor, absmax: torch.Tensor,
                absmax2: torch.Tensor | None):
        return torch.Tensor._make_wrapper_subclass(cls, size, dtype=torch.uint8, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, layout: NF4Layout, size: torch.Size, packed: torch.Tensor, absmax: torch.Tensor,
                 absmax2: torch.Tensor | None):
        self.nf4_layout = layout
        self.packed = packed  # (g, group_bytes) uint8
        self.absmax = absmax  # (g, group_blocks) uint8 or fp32
        self.absmax2 = absmax2  # (g,) fp32, or None without double quantization

    @classmethod
    def empty(cls, layout: NF4Layout, size: torch.Size, device: torch.device) -> "NF4Shard":
        """A shard of no groups yet: what FSDP allocates (new_zeros) before copying its chunk into it."""
        return cls(layout, size, torch.empty(0, layout.group_bytes, dtype=torch.uint8, device=device),
                   torch.empty(0, layout.group_blocks, dtype=layout.absmax_dtype, device=device),
                   torch.empty(0, dtype=torch.float32, device=device) if layout.nested else None)

    def inner(self) -> list[torch.Tensor]:
        return [self.packed, self.absmax] + ([self.absmax2] if self.absmax2 is not None else [])

    def _with(self, size, inner: list[torch.Tensor]) -> "NF4Shard":
        return NF4Shard(self.nf4_layout, torch.Size(size), inner[0], inner[1], inner[2] if len(inner) > 2 else None)

    def local_bytes(self) -> int:
        """Bytes this rank holds of the weight: its groups and the whole tables."""
        return sum(t.numel() * t.element_size() for t in self.inner()) + self.nf4_layout.table_bytes()

    def __repr__(self) -> str:
        layout = self.nf4_layout
        n, k = layout.shape
        return f"NF4Shard({n}x{k} {layout.quant_type}, {self.packed.shape[0]} of {layout.n_groups} groups)"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shard = args[0]
        # What FSDP2 does to a padded shard: detach it (nn.Parameter, DTensor), keep a flat view, narrow
        # it to the chunk's length (all chunks have the first one's length here), copy its chunk into it.
        # Views share the inner tensors, so a copy into one (growing an empty shard) fills them all.
        if func in (aten.detach.default, aten.alias.default):
            return shard._with(shard.shape, shard.inner())
        if func is aten.view.default and list(args[1]) == [-1]:
            return shard._with([shard.numel()], shard.inner())
        if func is aten.view.default and list(args[1]) == list(shard.shape):  # DTensor.to_local()
            return shard._with(shard.shape, shard.inner())
        if func is aten.slice.Tensor:
            dim, start, end = (list(args[1:4]) + [0, None, None])[:3]
            if dim == 0 and (start or 0) == 0 and (end is None or end >= shard.shape[0]):
                return shard._with(shard.shape, shard.inner())
        if func is aten.copy_.default and isinstance(args[1], NF4Shard):
            for dst, src in zip(shard.inner(), args[1].inner(), strict=True):
                dst.resize_(src.shape).copy_(src)
            return shard
        # What CPUOffloadPolicy does (_fsdp_param.py): keep the shard on the host (.cpu(), pinned) and move it
        # to the device before each all-gather (.to(device, non_blocking=True)). Bytes move as bytes; the
        # small tables stay in the layout, on the device the weight was quantized on.
        if func is aten._to_copy.default:
            if kwargs.get("dtype", torch.uint8) != torch.uint8:
                raise NotImplementedError(f"a 4-bit shard is bytes; it cannot become {kwargs['dtype']}")
            moved = [t.to(device=kwargs.get("device", t.device), non_blocking=kwargs.get("non_blocking", False))
                     for t in shard.inner()]
            return shard._with(shard.shape, moved)
        if func is aten._pin_memory.default:
            return shard._with(shard.shape, [t.pin_memory() for t in shard.inner()])
        if func is aten.is_pinned.default:
            return all(t.is_pinned() for t in shard.inner())
        raise NotImplementedError(f"NF4Shard does not support {func}")

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """All-gather inputs: this rank's groups, each part in its own dtype (FSDP gathers them as bytes).

        On a mesh of one rank FSDP2 gathers nothing: it copies a parameter's first all-gather input only
        (torch 2.13, _fsdp_param_group.py `wait_for_unshard`), so there every part goes into one byte buffer:
        the packed codes first (the unsharded weight's data must start the buffer: FSDP as_strided's it at
        offset 0), then absmax and the nested absmax, each at a multiple of 4 bytes (a group's packed codes
        are 32 or 8,192 bytes) so that they view back as fp32 in fsdp_post_all_gather."""
        if mesh is not None and mesh.size() == 1:
            return (torch.cat([t.reshape(-1).view(torch.uint8) for t in self.inner()]),), None
        return tuple(self.inner()), None

    def _split_one_buffer(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """The parts (packed, absmax, absmax2) viewed out of one rank's byte buffer (fsdp_pre_all_gather)."""
        layout = self.nf4_layout
        rows = buffer.numel() // layout.one_buffer_bytes_per_group()  # groups in the buffer
        parts, start = [], 0
        for width, dtype in layout.group_parts():  # packed, absmax, absmax2: the buffer's order
            size = rows * width * dtype.itemsize
            parts.append(buffer[start:start + size].view(dtype).view(rows, width))
            start += size
        return [parts[0], parts[1]] + ([parts[2].view(-1)] if layout.nested else [])

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The unsharded weight: a ShardableParams4bit whose data and quant_state view the gathered
        buffers, trimmed to the layer's size. FSDP frees and refills those buffers in place (storage
        resize), so the weight built on the first all-gather stays valid for every later one."""
        layout = self.nf4_layout
        parts = self._split_one_buffer(all_gather_outputs[0]) if len(all_gather_outputs) == 1 else all_gather_outputs
        packed, absmax = parts[0], parts[1]  # (world*g, group_bytes), (world*g, blocks)
        absmax2 = parts[2] if layout.nested else None  # (world*g,)
        if out is not None:
            if out.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr():
                raise AssertionError("the unsharded 4-bit weight must view FSDP's all-gather output")
            return None
        data = packed.view(-1)[:layout.n_bytes].view(layout.n_bytes, 1)  # the Params4bit's [(N*K+1)//2, 1]
        state = layout.quant_state(absmax.view(-1)[:layout.n_blocks],
                                   None if absmax2 is None else absmax2[:layout.n_groups])
        weight = ShardableParams4bit(data, requires_grad=False, quant_state=state, blocksize=layout.blocksize,
                                     compress_statistics=layout.nested, quant_type=layout.quant_type,
                                     quant_storage=torch.uint8, bnb_quantized=True)
        return weight, tuple(all_gather_outputs)


def _4bit_layers(model: nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def make_4bit_shardable(model: nn.Module) -> int:
    """Swap every bitsandbytes 4-bit weight of `model` (a model or any submodule, e.g. one decoder layer)
    for a ShardableParams4bit over the same tensors, in place, so that `fully_shard` shards it: packed
    codes and statistics. Call it after the weights are quantized (and LoRA added), before `fully_shard`
    is applied to a module holding them. Without FSDP the model computes exactly what it did. Returns how
    many weights it converted (already converted ones are left as they are)."""
    from minilora.lora import LoRALinear

    layers = [m for m in _4bit_layers(model)
              if isinstance(m.weight, bnb.nn.Params4bit) and not isinstance(m.weight, ShardableParams4bit)]
    for layer in layers:
        NF4Layout.of(layer.weight)  # refuse what cannot be sharded before anything changes
    for layer in layers:
        layer.weight = ShardableParams4bit.wrap(layer.weight)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.forget_paths()  # a kept fused path holds the tensors of the weight it was decided on
    return len(layers)


@dataclass(frozen=True)
class BaseBytes:
    """Bytes of a model's 4-bit base weights (packed codes + statistics + tables): on this rank, and whole."""

    local: int
    whole: int


def base_bytes(model: nn.Module) -> BaseBytes:
    """What this rank holds of the 4-bit base between forwards, against the unsharded total (for memory
    benchmarks). A weight sharded by FSDP counts its shard; any other 4-bit weight counts whole."""
    local = whole = 0
    for layer in _4bit_layers(model):
        weight = layer.weight
        shard = getattr(weight, "_local_tensor", None)  # a DTensor of FSDP
        if isinstance(shard, NF4Shard):
            local += shard.local_bytes()
            whole += shard.nf4_layout.whole_bytes()
        else:
            size = NF4Layout.of(weight).whole_bytes()
            local += size
            whole += size
    return BaseBytes(local, whole)
