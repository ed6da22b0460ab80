"""Memory of a QLoRA run sharded with FSDP2, planned from a model config alone (no weights, no GPU).

The model is built from its config under FakeTensorMode (shapes, no memory) and given LoRA by
minilora's own `add_lora` (its target matching, its parameter count). From that skeleton:

    NF4 base        bitsandbytes' layout as minilora.quant.quantize_linear stores it (blocksize 64, double
                    quantization): packed uint8 [(n+1)//2], absmax uint8 [blocks], nested absmax fp32
                    [ceil(blocks/256)], and per layer the NF4 code (16 fp32), the nested code (256 fp32) and
                    the offset (1 fp32). Packed bytes and statistics shard with their blocks (as torchao's
                    NF4Tensor all-gathers both); the small code tables stay whole on every GPU.
    other weights   embeddings, norms, lm_head in the compute dtype (bf16), sharded.
    LoRA            fp32 parameters, fp32 gradients, AdamW's two fp32 moments: all sharded.
    all-gather      FSDP2 as minilora/training/fsdp.py applies it (`fully_shard` per decoder layer, on the
                    input embeddings unless tied to the head, then the root): the root group (final norm,
                    lm_head; the embeddings too where tied) stays unsharded from the forward to the end of the
                    backward; the embeddings' own group only for their forward (frozen: not for backward);
                    one decoder layer is unsharded while it runs and the next is prefetched, each with its
                    LoRA gradient before the reduce-scatter.
    activations     minilora.training.recompute.activation_bytes, the probe `--recompute auto` uses, run on
                    the skeleton under bf16 autocast: what autograd keeps, per token and fixed. Under `full`
                    a backward also holds one recomputed layer's activations; every backward holds the
                    gradients of the widest tensors it passes (stated in `backward_working_bytes`).
    loss            minilora.training.loss: logits in chunks of CHUNK_ROWS rows (bf16 logits, their fp32 copy,
                    fp32 log-softmax and its gradient: 14 bytes per logit).
    overhead        CUDA context and the caching allocator's slack (assumptions below).

With `offload`, FSDP2's CPUOffloadPolicy keeps the sharded parameters, gradients and optimizer state in
(pinned) host memory: the GPU holds what is unsharded (all-gather buffers), activations and the loss.

Skeletons of 1 and 2 decoder layers are probed and extrapolated linearly to the model's depth: decoder
layers of one model are alike, and a 70B skeleton of 80 layers takes ~15 s to build on a CPU.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from minilora.errors import UserError
from minilora.inject import add_lora, count_parameters, lora_layers
from minilora.recipe import DEFAULT_R, DEFAULT_TARGETS
from minilora.stream_load import embeddings_tied
from minilora.training.loss import CHUNK_ROWS
from minilora.training.recompute import activation_bytes, decoder_layers, enable_recompute

GiB = 2**30
BLOCKSIZE = 64  # NF4 block, as minilora.quant.quantize_linear stores it
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization of the absmax values
# Per quantized linear, whole on every GPU: NF4 code (16 fp32), nested dynamic code (256 fp32), offset (fp32).
CODE_TABLE_BYTES = 4 * (16 + 256 + 1)
COMPUTE_BYTES = 2  # bf16: the compute dtype on GPUs, and the dtype of the weights that stay unquantized
LORA_BYTES = 4  # fp32 LoRA parameters and gradients (minilora/lora.py)
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32 like the parameters
LOGIT_BYTES = 2 + 4 + 4 + 4  # per logit: bf16 head output, fp32 copy, fp32 log-softmax, fp32 gradient
# Assumptions, not measurements. The CUDA context (driver, cuBLAS/cuDNN workspaces, NCCL's buffers) lives
# outside PyTorch's allocator: ~0.3-0.6 GiB on recent drivers; nvidia-smi counts it, torch.cuda does not.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
# The caching allocator reserves more than is allocated at the peak: 10.22 vs 9.16 GiB (+11.6%) in
# Answer.AI's Llama-2-7B LoRA runs (benchmarks_03_2024.md in https://github.com/AnswerDotAI/fsdp_qlora).
ALLOCATOR_SLACK = 0.10
RECOMPUTE_MODES = ("full", "none")  # selective keeps its products inside checkpoint's own cache: unprobed


@dataclass(frozen=True)
class Settings:
    """One run to plan: the model's config and the training settings that size its memory."""

    config: PretrainedConfig
    gpus: int = 1
    gpu_gib: float = 80.0
    offload: bool = False
    batch_size: int = 4
    seq_len: int = 2048
    recompute: str = "full"
    r: int = DEFAULT_R
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.05

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def load_config(path: str | Path) -> PretrainedConfig:
    """A model folder (its config.json) or a config.json path -> transformers config; UserError otherwise."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--config {path}: no such config file (give a model folder or its config.json)")
    try:
        values = json.loads(file.read_text())
        model_type = values.pop("model_type")
        return AutoConfig.for_model(model_type, **values)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--config {file}: not a usable model config ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class LinearBytes:
    """bitsandbytes' NF4 storage of one [out, in] weight with double quantization (blocksize 64)."""

    weights: int

    @property
    def blocks(self) -> int:
        return math.ceil(self.weights / BLOCKSIZE)

    @property
    def packed(self) -> int:
        return (self.weights + 1) // 2  # two 4-bit codes a byte

    @property
    def statistics(self) -> int:
        """Sharded statistics: uint8 absmax per block + fp32 nested absmax per 256 blocks."""
        return self.blocks + 4 * math.ceil(self.blocks / NESTED_BLOCKSIZE)


@dataclass(frozen=True)
class Inventory:
    """What one skeleton holds, in bytes and counts (per decoder layer, and outside the layers)."""

    layers: int
    layer_linears: tuple[int, ...]  # weights of each quantized linear of one decoder layer
    layer_other: int  # norm (and bias) elements of one layer, in the compute dtype
    layer_lora: int  # LoRA parameters of one layer
    root_lora: int  # LoRA parameters outside the decoder layers (an lm_head target), fp32
    layer_widest: int  # widest output among one layer's linears (e.g. SwiGLU's intermediate size)
    root: int  # elements outside the decoder layers (embeddings, final norm, lm_head), compute dtype
    embeddings: int  # elements of the input embeddings where they are their own FSDP group (untied), else 0
    hidden: int
    vocab: int

    def layer_nf4(self) -> tuple[int, int, int]:
        """(packed, sharded statistics, code tables) bytes of one decoder layer."""
        stats = [LinearBytes(n) for n in self.layer_linears]
        return (sum(s.packed for s in stats), sum(s.statistics for s in stats),
                CODE_TABLE_BYTES * len(stats))

    @property
    def lora(self) -> int:
        return self.layers * self.layer_lora + self.root_lora


def _config_with_layers(config: PretrainedConfig, layers: int) -> PretrainedConfig:
    small = config.__class__.from_dict(config.to_dict())
    small.num_hidden_layers = layers
    if getattr(small, "layer_types", None) is not None:  # per-layer attention kinds, one per layer
        small.layer_types = small.layer_types[:layers]
    return small


def causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, Hq, T, D), key/value (B, Hkv, T, D) -> ((B, T, Hq, D), None): one causal sequence per row, with
    no mask tensor, saving what a fused kernel saves (q, k, v, output, log-sum-exp), as minilora.attention's
    kernel does on a GPU. transformers' sdpa path cannot stand in: under FakeTensorMode it builds a (T, T)
    mask and falls back to the math kernel, whose saved (T, T) scores a two-length probe would read as per
    token. Sliding windows change which keys are read, not what is saved, and are left out."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2), None


PLAN_ATTENTION = "minilora_plan_causal"


def skeleton(config: PretrainedConfig, settings: Settings, recompute: str | None,
             dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of `config` with minilora's LoRA, built under the caller's FakeTensorMode (bf16: a GPU's)."""
    AttentionInterface.register(PLAN_ATTENTION, causal_attention)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=PLAN_ATTENTION)
    except Exception as err:  # a config transformers cannot build: heads that do not divide the width, ...
        raise UserError(f"--config: cannot build a model from it ({type(err).__name__}: {err})") from None
    add_lora(model, r=settings.r, dropout=settings.dropout, targets=list(settings.targets))
    if recompute == "full":
        enable_recompute(model, mode="full")
    return model.train()


def _inventory(model: nn.Module, layers: int) -> Inventory:
    """Counts of a 1-layer skeleton, for a model of `layers` decoder layers."""
    layer = decoder_layers(model)[0]
    head = model.get_output_embeddings()
    # minilora.quant.quantize_linears' rule: every plain nn.Linear but the output head becomes 4-bit.
    quantized = [m for m in layer.modules() if type(m) is nn.Linear and m is not head]
    in_layer = {id(p) for p in layer.parameters()}
    lora_ids = {id(p) for m in lora_layers(model).values() for p in m.adapter_params().values()}
    quantized_ids = {id(m.weight) for m in quantized}
    other = sum(p.numel() for p in layer.parameters() if id(p) not in lora_ids | quantized_ids)
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layer and id(p) not in lora_ids)
    layer_lora = sum(p.numel() for p in layer.parameters() if id(p) in lora_ids)
    trainable, _ = count_parameters(model)  # minilora's count: this layer's LoRA and any outside the layers
    return Inventory(layers=layers, layer_linears=tuple(m.weight.numel() for m in quantized), layer_other=other,
                     layer_lora=layer_lora, root_lora=trainable - layer_lora,
                     layer_widest=max(m.out_features for m in quantized),
                     root=root, embeddings=0 if embeddings_tied(model) else model.get_input_embeddings().weight.numel(),
                     hidden=model.config.hidden_size, vocab=model.config.vocab_size)


def _probe(config: PretrainedConfig, settings: Settings, recompute: str | None, layers: int) -> tuple[float, float]:
    """activation_bytes of a `layers`-deep skeleton: (fixed bytes, bytes per token)."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.autocast("cpu", dtype=torch.bfloat16):
        model = skeleton(_config_with_layers(config, layers), settings, recompute)
        return activation_bytes(model, torch.device("cpu"))


@dataclass(frozen=True)
class Activations:
    """Activation bytes of the whole model, per token and fixed, with and without recompute."""

    kept_fixed: float
    kept_per_token: float
    layer_per_token: float  # what one layer keeps without recompute (what a recompute rebuilds)


def activations(settings: Settings) -> Activations:
    """Probes skeletons of 1 and 2 layers and extrapolates to the model's depth."""
    depth = settings.config.num_hidden_layers
    one, two = (_probe(settings.config, settings, settings.recompute, n) for n in (1, 2))
    fixed = one[0] + (depth - 1) * (two[0] - one[0])
    per_token = one[1] + (depth - 1) * (two[1] - one[1])
    if settings.recompute == "none":
        layer = two[1] - one[1]
    else:
        plain = [_probe(settings.config, settings, None, n)[1] for n in (1, 2)]
        layer = plain[1] - plain[0]
    return Activations(max(fixed, 0.0), per_token, layer)


def inventory(config: PretrainedConfig, settings: Settings) -> Inventory:
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = skeleton(_config_with_layers(config, 1), settings, None)
        return _inventory(model, config.num_hidden_layers)


def backward_working_bytes(inv: Inventory, tokens: int) -> int:
    """Gradients a layer's backward holds at once, beyond the kept activations: the layer's output and input
    gradients (hidden wide) and two of its widest outputs' (SwiGLU's gate and up), in bf16."""
    return tokens * COMPUTE_BYTES * (2 * inv.hidden + 2 * inv.layer_widest)


def loss_bytes(inv: Inventory, tokens: int) -> int:
    """minilora's chunked loss: one chunk of logits alive at a time, plus the gathered hidden rows."""
    return min(tokens, CHUNK_ROWS) * inv.vocab * LOGIT_BYTES + tokens * inv.hidden * COMPUTE_BYTES


@dataclass
class Plan:
    """Bytes per GPU (and per host with offload), line by line; `sharded` rows are divided by the GPUs."""

    settings: Settings
    inventory: Inventory
    gpu: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    @property
    def fits(self) -> bool:
        return self.gpu_total <= self.settings.gpu_gib * GiB

    @property
    def trainable(self) -> int:
        return self.inventory.lora


def plan(settings: Settings, acts: Activations | None = None) -> Plan:
    """The memory plan of `settings` (activations probed unless given)."""
    if settings.recompute not in RECOMPUTE_MODES:
        raise UserError(f"--recompute {settings.recompute}: the plan knows {', '.join(RECOMPUTE_MODES)}")
    if settings.gpus < 1 or settings.batch_size < 1 or settings.seq_len < 1 or settings.r < 1:
        raise UserError("--gpus, --batch-size, --seq-len and --r must be at least 1")
    if not settings.gpu_gib > 0 or not 0 <= settings.dropout < 1:
        raise UserError("--gpu-gb must be positive and --dropout in [0, 1)")
    inv = inventory(settings.config, settings)
    acts = acts or activations(settings)
    n, layers, tokens = settings.gpus, inv.layers, settings.tokens
    packed, stats, tables = inv.layer_nf4()
    sharded = {  # whole-model bytes, divided by the GPUs
        "NF4 packed weights (0.5 byte/weight)": layers * packed,
        "NF4 statistics (absmax uint8/64, fp32/16384)": layers * stats,
        "bf16 weights (embeddings, norms, lm_head)": (inv.root + layers * inv.layer_other) * COMPUTE_BYTES,
        "LoRA parameters (fp32)": inv.lora * LORA_BYTES,
        "LoRA gradients (fp32)": inv.lora * LORA_BYTES,
        "AdamW state (2 x fp32)": inv.lora * LORA_BYTES * ADAMW_STATES,
    }
    out = Plan(settings, inv)
    where = out.host if settings.offload else out.gpu
    for name, total in sharded.items():
        where[name] = total / n
    out.gpu["NF4 code tables (whole on each GPU)"] = layers * tables
    layer_unsharded = packed + stats + tables + inv.layer_other * COMPUTE_BYTES + 2 * inv.layer_lora * LORA_BYTES
    shard_copy = 2 * layer_unsharded / n if settings.offload else 0  # offload: the shards come up first
    out.gpu["all-gather: root group + current and prefetched layer"] = (
        (inv.root - inv.embeddings) * COMPUTE_BYTES + 2 * inv.root_lora * LORA_BYTES + 2 * layer_unsharded
        + shard_copy)
    out.gpu[f"activations kept (recompute {settings.recompute})"] = acts.kept_fixed + acts.kept_per_token * tokens
    recomputed = acts.layer_per_token * tokens if settings.recompute == "full" else 0
    out.gpu["backward working set (recomputed layer + gradients)"] = recomputed + backward_working_bytes(inv, tokens)
    out.gpu[f"loss (chunks of {CHUNK_ROWS} rows of logits)"] = loss_bytes(inv, tokens)
    out.gpu["allocator slack (10% of the above)"] = ALLOCATOR_SLACK * sum(out.gpu.values())
    out.gpu["CUDA context (assumed)"] = CUDA_CONTEXT_BYTES
    return out


def table(p: Plan) -> str:
    """The plan as a Markdown table: per GPU, then per host with offload."""
    s = p.settings
    lines = [f"| per GPU ({s.gpus} GPUs{', CPU offload' if s.offload else ''}) | GiB |", "| --- | ---: |"]
    lines += [f"| {name} | {value / GiB:.2f} |" for name, value in p.gpu.items()]
    verdict = "fits" if p.fits else "does not fit"
    lines.append(f"| **total per GPU** ({verdict} in {s.gpu_gib:g} GiB) | **{p.gpu_total / GiB:.2f}** |")
    if p.host:
        lines += [f"| host, per rank: {name} | {value / GiB:.2f} |" for name, value in p.host.items()]
        lines.append(f"| **host total ({s.gpus} ranks, pinned)** | **{s.gpus * p.host_total / GiB:.2f}** |")
    return "\n".join(lines)


def describe(s: Settings) -> str:
    targets = ",".join(s.targets)
    return (f"batch {s.batch_size} x {s.seq_len} tokens, recompute {s.recompute}, LoRA r={s.r} on {targets} "
            f"(dropout {s.dropout:g})")
