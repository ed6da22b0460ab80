"""Put LoRA layers into a model: match target modules by name, replace them, freeze the rest."""

import re
from collections.abc import Sequence

import torch
from torch import nn

from minilora.dora import DoRALinear
from minilora.errors import UserError
from minilora.lora import LoRALinear, dequantize_weight, is_4bit, lora_scale, refuse_4bit_merge
from minilora.lora_init import (
    BASE_CHANGING,
    LOFTQ,
    ZEROS,
    initial_factors,
    one_cpu_thread,
    parse_init,
    subtract_update,
)
from minilora.recipe import DEFAULT_TARGETS
from minilora.training.recompute import canonical_name


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a
    name equal to an entry or ending in `.entry`."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def unmatched_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The entries of a target list that match no module of `model` (exact or `.`-suffix match)."""
    names = [name for name, _ in model.named_modules() if name]
    return [t for t in targets if not any(_matches(name, [t]) for name in names)]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bnb's Linear4bit and Linear8bitLt subclass nn.Linear


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRA layer, paths as in the plain model (gradient-checkpoint wrappers removed)."""
    return {canonical_name(name): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    targets: Sequence[str] | str | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    init: str = ZEROS,
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    quantizer=None,
) -> list[str]:
    """Replace each matching linear layer with a LoRALinear (a DoRALinear if `use_dora`) and freeze
    all other parameters.

    `init`: "zeros" (A kaiming-uniform, B = 0), or "loftq", "loftq:N", "pissa", "pissa:N", "olora"
    (minilora/lora_init.py), computed from each target's full-precision weight: on a full-precision base
    here (pissa and olora subtract scale · B0 A0 from it, as PEFT does), on a 4-bit base only while it
    loads (`load_base(..., lora=dict(init=...))`, which passes its `quantizer`: the 4-bit layer each
    target's base becomes). `initial`: module name -> (A0, B0) to use instead of computing them (a resumed
    run rebuilds its base from the factors it started with).

    Returns the names of the replaced modules. Raises UserError when nothing matches.
    """
    targets = list(DEFAULT_TARGETS) if targets is None else targets
    try:
        method, _ = parse_init(init)
    except ValueError as err:
        raise UserError(str(err)) from None
    if lora_layers(model):
        raise UserError("the model already has LoRA layers; load a fresh base to add another adapter")
    names = [name for name, m in model.named_modules() if name and _matches(name, targets)]
    not_linear = [n for n in names if not _is_linear(model.get_submodule(n))]
    if not_linear:
        kind = type(model.get_submodule(not_linear[0])).__name__
        raise UserError(f"target module {not_linear[0]!r} is a {kind}; LoRA targets must be linear layers")
    if not names:
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        raise UserError(
            f"no module of {type(model).__name__} matches the LoRA targets ({shown}); "
            f"linear layers it has: {', '.join(linear_layer_kinds(model)) or 'none'}"
        )
    _check_init(model, names, init, method, r, use_dora, quantizer)
    model.requires_grad_(False)
    layer_class = DoRALinear if use_dora else LoRALinear
    device = quantizer.device if quantizer is not None else model.get_submodule(names[0]).weight.device
    with one_cpu_thread(device):  # each target's quantization and init, whatever the init
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            if method == ZEROS:
                base = quantizer(linear) if quantizer is not None else linear
                setattr(parent, child, layer_class(base, r, alpha, dropout, use_rslora))
                continue
            given = None if initial is None else initial.get(name)
            if initial is not None and given is None:
                raise UserError(f"init={init!r}: no initial factors given for {name}")
            base, a0, b0 = _initialise(linear, init, method, r, lora_scale(alpha, r, use_rslora), quantizer, given)
            layer = layer_class(base, r, alpha, dropout, use_rslora)
            layer.set_initial(a0, b0, subtracted=method in BASE_CHANGING)
            setattr(parent, child, layer)
    return names


def _check_init(model: nn.Module, names: list[str], init: str, method: str, r: int, use_dora: bool,
                quantizer) -> None:
    if method == ZEROS:
        return
    if use_dora:
        raise UserError(f"init={init!r} with DoRA is not supported: DoRA's magnitude is the row norm of the base "
                        "it starts from; use init='zeros' with DoRA")
    if any(is_4bit(model.get_submodule(n)) for n in names):
        raise UserError(f"init={init!r} is computed from the full-precision weights, which a 4-bit base no longer "
                        f"holds: load it with load_base(..., lora=dict(init={init!r}, ...))")
    narrow = [n for n in names if min(model.get_submodule(n).in_features, model.get_submodule(n).out_features) < r]
    if narrow:
        layer = model.get_submodule(narrow[0])
        raise UserError(f"init={init!r} takes r={r} directions of each weight, but {narrow[0]} is "
                        f"[{layer.out_features}, {layer.in_features}]: use a rank at most its smaller side")
    if method == LOFTQ and quantizer is None:
        raise UserError("init='loftq' fits the adapter to the 4-bit quantization error; a full-precision base "
                        "has none (load a 4-bit base with load_base(..., lora=dict(init='loftq', ...)))")


@torch.no_grad()
def _initialise(linear: nn.Linear, init: str, method: str, r: int, scale: float, quantizer,
                given: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(base layer, A0 [r, in], B0 [out, r]) for one target; computed on the device the base goes to."""
    device = quantizer.device if quantizer is not None else linear.weight.device
    weight = linear.weight.data.to(device)  # (out, in), the compute dtype
    if method == LOFTQ:  # the base is the ordinary 4-bit W; the factors fit what its rounding lost
        base = quantizer(linear)
        a0, b0 = given if given is not None else initial_factors(weight, init, r, scale, dequantize_weight(base))
        return base, a0.to(device), b0.to(device)
    a0, b0 = (t.to(device) for t in given) if given is not None else initial_factors(weight, init, r, scale)
    residual = subtract_update(weight, a0, b0, scale)  # (out, in)
    if quantizer is not None:
        return quantizer(linear, residual), a0, b0
    linear.weight.data.copy_(residual)
    return linear, a0, b0


def linear_layer_kinds(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (what `--targets` can name)."""
    kinds = {name.rpartition(".")[2] for name, m in model.named_modules() if name and _is_linear(m)}
    return sorted(kinds)


def matched_target_names(model: nn.Module) -> list[str]:
    """Last name components of the LoRA layers, sorted: the `target_modules` a PEFT config needs."""
    return sorted({name.rpartition(".")[2] for name in lora_layers(model)})


def _logical_numel(p: torch.Tensor) -> int:
    # A bnb Params4bit is stored packed two per byte as [(N*K+1)//2, 1]; count the N*K weights it holds.
    # Sharded by FSDP it is a DTensor over an NF4Shard (minilora/fsdp_nf4.py), whose layout has that shape.
    state = getattr(p, "quant_state", None)
    if state is None:
        state = getattr(getattr(p, "_local_tensor", None), "nf4_layout", None)
    return int(state.shape.numel()) if state is not None else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights at their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = _logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable {trainable:,} / {total:,} ({share:.2f}%)"


def print_trainable(model: nn.Module) -> None:
    print(trainable_summary(model))


def merge_lora(model: nn.Module, dequantize: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
    """Fold every LoRA update into its base weight. A 4-bit base is refused unless `dequantize`,
    which first replaces it with a full-precision (`dtype`) copy: never a silent re-quantization."""
    layers = lora_layers(model)
    if not dequantize:
        refuse_4bit_merge(layers)
    for layer in layers.values():
        if dequantize and is_4bit(layer.base_layer):
            layer.merge_into_full_precision(dtype)
        else:
            layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer's update on or off (the base model's output when off)."""
    for layer in lora_layers(model).values():
        layer.disabled = not enabled


class disable_adapter:
    """Context manager: `with disable_adapter(model): base_logits = model(x).logits`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        set_adapter_enabled(self.model, False)
        return self.model

    def __exit__(self, *exc):
        set_adapter_enabled(self.model, True)
        return False


def set_kernel_mode(model: nn.Module, mode: str | None, config=None) -> None:
    """How every LoRA layer of `model` computes over a 4-bit base: "auto", "triton" or "torch" (None:
    MINILORA_KERNELS, else "auto"; minilora/dispatch.py), with the kernels' `config` (a
    minilora.kernels.KernelConfig; None: their default)."""
    for layer in lora_layers(model).values():
        layer.set_kernels(mode, config)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in m.adapter_params().values()]


__all__ = [
    "DEFAULT_TARGETS", "add_lora", "count_parameters",
    "disable_adapter", "linear_layer_kinds", "lora_layers", "lora_parameters",
    "matched_target_names", "merge_lora", "print_trainable", "set_adapter_enabled", "set_kernel_mode",
    "trainable_summary", "unmatched_targets", "unmerge_lora",
]
