"""Load a base model as an adapter was trained on it, with the adapter on top: what generate and merge
both start from. The quantization and compute dtype come from the run's run.json (run_record.py)
unless the caller says otherwise."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minilora.adapter import load_adapter, read_adapter_config
from minilora.errors import UserError, shown
from minilora.quant import default_device, load_base
from minilora.recipe import QUANT_TYPES
from minilora.run_record import TrainedBase, read_trained_base


@dataclass(frozen=True)
class TrainedSetup:
    """What `load_trained` will load, decided before any weights are read."""

    base: str  # the base model's name or folder
    trained: TrainedBase
    quant: str  # the trained quant, or the caller's override
    quant_source: str  # for the user: where `quant` came from

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.trained.compute_dtype) if self.trained.compute_dtype else None


def resolve_trained(adapter_dir: str | Path | None, model: str | None = None, quant: str | None = None) -> TrainedSetup:
    """The base (`model`, default the adapter config's base_model_name_or_path) and how to load it."""
    config = read_adapter_config(adapter_dir) if adapter_dir is not None else {}
    base = model or config.get("base_model_name_or_path")
    if not base:
        where = f"{adapter_dir}: the adapter config names no base model" if adapter_dir else "no --adapter"
        raise UserError(f"{where}; pass --model")
    if quant is not None and quant not in QUANT_TYPES:
        raise UserError(f"--quant {quant!r}: expected one of {', '.join(QUANT_TYPES)}")
    trained = read_trained_base(adapter_dir) if adapter_dir is not None else TrainedBase()
    if quant is not None:
        source = "as given"
    else:
        source = f"from {trained.source}" if trained.source != "default" else "default, no run.json found"
    return TrainedSetup(base, trained, quant or trained.quant, source)


def check_device(name: torch.device | str) -> torch.device:
    """`--device` as a torch.device this machine has: torch accepts `cuda:3` without a GPU and fails only
    when the first tensor moves there."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"--device {shown(name)}: {str(err)[:200]}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA GPU"
            raise UserError(f"--device {device}: this machine has {have}; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {device}: minilora runs on cpu or cuda")
    return device


def load_trained(setup: TrainedSetup, adapter_dir: str | Path | None,
                 device: torch.device | str | None = None) -> nn.Module:
    """The base loaded as `setup` says, with the adapter in `adapter_dir` on it (strict)."""
    device = check_device(device) if device is not None else default_device()
    net = load_base(setup.base, quant=setup.quant, double_quant=setup.trained.double_quant,
                    compute_dtype=setup.compute_dtype, device=device)
    if adapter_dir is not None:
        load_adapter(net, adapter_dir)
    return net
