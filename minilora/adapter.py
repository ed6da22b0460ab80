"""Adapters on disk in PEFT's format, so `PeftModel.from_pretrained(base, folder)` loads ours.

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  [r, in]   fp32
                                base_model.model.<module path>.lora_B.weight  [out, r]  fp32
                                base_model.model.<module path>.lora_magnitude_vector  [out]  fp32 (DoRA only)

A layer whose init changed its base (PiSSA, OLoRA: the base holds W - scale · B0 A0) is saved as PEFT's
`path_initial_model_for_weight_conversion` saves it, a plain LoRA of the ordinary base W:
lora_A = [A; A0] [2r, in], lora_B = [B, -B0] [out, 2r], r and alpha doubled (alpha x sqrt 2 with rsLoRA,
so the scale is unchanged), `init_lora_weights: true`. Loading such a file back onto the layers it came
from (a resumed run) splits it again and checks that A0, B0 are the layer's own.

Our loader is strict where PEFT's is not (PEFT loads with strict=False, so a renamed key loads
nothing and only warns): every missing or unexpected key and every shape mismatch is an error.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.adapter_check import check_adapter_config, check_adapter_tensors
from minilora.atomic import atomic_write, atomic_write_json
from minilora.dora import DoRALinear
from minilora.errors import AdapterError
from minilora.inject import add_lora, lora_layers, matched_target_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # PEFT's config is ~1 KB; a larger one is a mistake (or hostile) and is not read
# PEFT's key = PREFIX + module path + SUFFIX[our parameter name]
PREFIX = "base_model.model."
SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "lora_magnitude_vector": ".lora_magnitude_vector"}


def peft_key(module_path: str, param: str) -> str:
    return PREFIX + module_path + SUFFIX[param]


def saved_factors(layer) -> dict[str, torch.Tensor]:
    """The layer's adapter tensors as saved: its parameters, converted when its init changed the base."""
    params = dict(layer.adapter_params())
    if layer.base_changed:
        params["lora_A"] = torch.cat([layer.lora_A, layer.initial_A], dim=0)  # (2r, in)
        params["lora_B"] = torch.cat([layer.lora_B, -layer.initial_B], dim=1)  # (out, 2r)
    return params


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed fp32 copies of every LoRA weight."""
    tensors = {}
    for path, layer in lora_layers(model).items():
        for param, value in saved_factors(layer).items():
            tensors[peft_key(path, param)] = value.detach().to("cpu", torch.float32).contiguous()
    return tensors


def saved_rank_alpha(layer) -> tuple[int, float]:
    """(r, lora_alpha) of the saved adapter: doubled rank for a converted layer, alpha such that the scale
    stays alpha / r (or alpha / sqrt(r)), as PEFT's conversion writes them."""
    if not layer.base_changed:
        return layer.r, layer.alpha
    return 2 * layer.r, layer.alpha * (2**0.5 if layer.use_rslora else 2)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    layers = list(lora_layers(model).values())
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    first = layers[0]

    def settings(m):
        return m.r, m.alpha, m.use_rslora, m.dropout_p, isinstance(m, DoRALinear), m.base_changed

    if any(settings(m) != settings(first) for m in layers):
        raise AdapterError("LoRA layers differ in r, alpha, rsLoRA, dropout, DoRA or init; one adapter config "
                           "cannot describe them")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    r, alpha = saved_rank_alpha(first)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout_p,
        "target_modules": matched_target_names(model),
        "use_rslora": first.use_rslora,
        "use_dora": isinstance(first, DoRALinear),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into `folder`, each atomically."""
    folder = Path(folder)
    config = adapter_config(model, base_model_name_or_path)
    tensors = adapter_tensors(model)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(folder / CONFIG_NAME, config)
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not path.is_file():
        raise AdapterError(f"{path}: missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: {path.stat().st_size:,} bytes is not an adapter config (at most "
                           f"{MAX_CONFIG_BYTES:,})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise AdapterError(f"{path}: not valid JSON ({str(err)[:200] or 'nested too deeply'})") from err
    return check_adapter_config(config, path)


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterError(f"{path}: not a readable safetensors file ({str(err)[:200]})") from err
    return check_adapter_tensors(tensors, path)


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Put the adapter in `folder` onto `model` (a base without LoRA, or one with matching LoRA).

    Strict: a key the model lacks, a LoRA layer without a key, or a wrong shape raises AdapterError
    naming it. Returns the LoRA module names.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors = read_adapter_weights(folder)
    layers = lora_layers(model)
    if not layers:
        add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0.0)),
                 targets=config["target_modules"], use_rslora=config.get("use_rslora") is True,
                 use_dora=config.get("use_dora") is True)
        layers = lora_layers(model)
    else:
        _check_existing_layers(layers, config, folder)
    expected = {peft_key(path, p): (layer, p) for path, layer in layers.items() for p in layer.adapter_params()}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterError(f"{folder / WEIGHTS_NAME}: key {unexpected[0]!r} matches no LoRA layer of the model "
                           f"({len(unexpected)} unexpected keys)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"{folder / WEIGHTS_NAME}: no tensor for {missing[0]!r} ({len(missing)} missing keys)")
    values = {}
    for key, (layer, p) in expected.items():
        saved = saved_factors(layer)[p]
        if tensors[key].shape != saved.shape:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: {key} has shape {list(tensors[key].shape)}, "
                               f"the model needs {list(saved.shape)} (r={saved_rank_alpha(layer)[0]})")
        values[key] = _trained_part(tensors[key], layer, p, folder / WEIGHTS_NAME, key)
    with torch.no_grad():
        for key, (layer, p) in expected.items():
            getattr(layer, p).copy_(values[key])
    return list(layers)


def _trained_part(tensor: torch.Tensor, layer, param: str, path: Path, key: str) -> torch.Tensor:
    """A converted factor's first half ([A; A0] -> A, [B, -B0] -> B), once its second half is checked to
    be the layer's own initial factor (else the base under the layer is not the one the adapter needs)."""
    if not layer.base_changed or param not in ("lora_A", "lora_B"):
        return tensor
    r = layer.r
    trained, initial = (tensor[:r], tensor[r:]) if param == "lora_A" else (tensor[:, :r], -tensor[:, r:])
    own = layer.initial_A if param == "lora_A" else layer.initial_B
    if not torch.equal(initial.to(own.device, own.dtype), own):
        raise AdapterError(f"{path}: {key} was converted from other initial factors than this model's base was "
                           "built from")
    return trained


def _check_existing_layers(layers: dict, config: dict, folder: Path) -> None:
    layer = next(iter(layers.values()))
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    saved_r = saved_rank_alpha(layer)[0]
    if saved_r != config["r"] or not math.isclose(layer.scale, scale):
        raise AdapterError(f"{folder / CONFIG_NAME}: r={config['r']}, scale={scale:g} do not fit the model's "
                           f"LoRA layers (r={saved_r}, scale={layer.scale:g})")
    if bool(config.get("use_dora", False)) != isinstance(layer, DoRALinear):
        raise AdapterError(f"{folder / CONFIG_NAME}: use_dora={bool(config.get('use_dora', False))} does not fit "
                           "the model's LoRA layers")


def read_initial_factors(folder: str | Path, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A0 [r, in], B0 [out, r]) from a converted adapter (rank 2r): its second halves."""
    folder = Path(folder)
    tensors = read_adapter_weights(folder)
    factors = {}
    for key, value in tensors.items():
        for param in ("lora_A", "lora_B"):
            suffix = SUFFIX[param]
            if key.startswith(PREFIX) and key.endswith(suffix):
                name = key[len(PREFIX):-len(suffix)]
                part = value[r:] if param == "lora_A" else -value[:, r:]
                factors.setdefault(name, {})[param] = part
    if not factors or any(len(f) != 2 for f in factors.values()) or any(
            f["lora_A"].shape[0] != r for f in factors.values()):
        raise AdapterError(f"{folder / WEIGHTS_NAME}: not a converted adapter of rank {2 * r}")
    return {name: (f["lora_A"], f["lora_B"]) for name, f in factors.items()}
