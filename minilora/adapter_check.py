"""The one check of a loaded adapter (config and weights), used by every reader: load_adapter (train's
resume, generate, merge) and inspect all come through adapter.read_adapter_config / read_adapter_weights.

An adapter folder is input from anywhere (a download, a colleague, a hand edit), and a value of the
wrong type or range does not fail where it is read: `lora_alpha: NaN` loads, then generate prints
nothing and merge writes NaN weights, all with exit 0. So each field is checked for type, range and
finiteness here, with one line naming the file, the field and the value (shortened).
"""

import math
import re

import torch

from minilora.errors import AdapterError, shown
from minilora.recipe import MAX_ALPHA, MAX_R

_MAX_TARGETS = 10_000  # module names in target_modules; a model has a few hundred linear layers
_MAX_NAME_CHARS = 1_000  # one name or regex


def _number(config: dict, key: str) -> bool:
    value = config.get(key)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_adapter_config(config, path) -> dict:
    """`config` (parsed adapter_config.json) if every field minilora reads is usable; else AdapterError."""

    def bad(key: str, want: str):
        raise AdapterError(f"{path}: '{key}' must be {want}, got {shown(config.get(key))}")

    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {shown(config.get('peft_type'))}, only 'LORA' adapters are "
                           "supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_R:
        bad("r", f"an integer in [1, {MAX_R}]")
    # A negative alpha is a negated update (inspect compares an adapter with its negative): only finiteness
    # and size are checked.
    if not _number(config, "lora_alpha") or not (math.isfinite(config["lora_alpha"])
                                                 and abs(config["lora_alpha"]) <= MAX_ALPHA):
        bad("lora_alpha", f"a finite number in [-{MAX_ALPHA:g}, {MAX_ALPHA:g}]")
    if "lora_dropout" in config and not (_number(config, "lora_dropout") and 0 <= config["lora_dropout"] < 1):
        bad("lora_dropout", "a number in [0, 1)")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not targets or len(targets) > _MAX_NAME_CHARS:
            bad("target_modules", f"a module name or regex of 1 to {_MAX_NAME_CHARS} characters")
        try:
            re.compile(targets)
        except (re.error, RecursionError, OverflowError) as err:
            raise AdapterError(f"{path}: 'target_modules' is not a valid regex ({err})") from None
    elif not (isinstance(targets, list) and 0 < len(targets) <= _MAX_TARGETS
              and all(isinstance(t, str) and 0 < len(t) <= _MAX_NAME_CHARS for t in targets)):
        bad("target_modules", "a list of module names or a regex string")
    base = config.get("base_model_name_or_path")
    if base is not None and not (isinstance(base, str) and len(base) <= 4096):
        bad("base_model_name_or_path", "a model name or folder (a string)")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):  # a string "false" would read as true
        if config.get(key) is not None and not isinstance(config[key], bool):
            bad(key, "true or false")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out adapters (GPT-2's Conv1D layout) are not supported by minilora")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{path}: bias {shown(config['bias'])} is not supported by minilora (only 'none')")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern"):
        if config.get(key):
            raise AdapterError(f"{path}: per-module {key} is not supported by minilora")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save ({shown(config['modules_to_save'])}) is not supported by "
                           "minilora")
    return config


def check_adapter_tensors(tensors: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """`tensors` if each is a floating-point tensor with only finite values; else AdapterError naming one."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterError(f"{path}: {shown(key, 120)} holds {value.dtype} values, not floating point")
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise AdapterError(f"{path}: {shown(key, 120)} holds {bad} non-finite values (NaN or inf) of "
                               f"{value.numel()}; the adapter is damaged or its training diverged")
    return tensors
