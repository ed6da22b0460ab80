"""minilora: QLoRA fine-tuning from the ground up.

    model = minilora.load_base("microsoft/Phi-3-mini-4k-instruct")   # NF4 + double quant
    minilora.add_lora(model, r=8, alpha=16, dropout=0.05)            # minilora.DEFAULT_TARGETS
    minilora.print_trainable(model)
    ...
    minilora.save_adapter(model, "out/")                             # PEFT's format

Generation and merging live in their modules (also command lines: `python -m minilora.generate`,
`python -m minilora.merge`): `from minilora.generate import generate`, `from minilora.merge import
merge_adapter`.

The names below are imported on first use (PEP 562), so `import minilora.training.cli` (and with it
`train.py --help`) does not pay for importing torch, transformers and bitsandbytes.
"""

import importlib
import logging

# On CPUs with AVX512-BF16, importing bitsandbytes logs a warning that an optional hub kernel package
# is missing. It concerns a CPU inference path we switch off (see quant.py); keep the console clean.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

_HOME = {
    "minilora.adapter": ("load_adapter", "read_adapter_config", "save_adapter"),
    "minilora.errors": ("AdapterError", "DataError", "UserError"),
    "minilora.inject": ("add_lora", "count_parameters", "disable_adapter", "lora_layers", "lora_parameters",
                        "merge_lora", "print_trainable", "set_adapter_enabled", "set_kernel_mode", "trainable_summary",
                        "unmerge_lora"),
    "minilora.lora": ("LoRALinear",),
    "minilora.quant": ("load_base", "load_tokenizer"),
    "minilora.recipe": ("DEFAULT_TARGETS",),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:  # a submodule: `import minilora; minilora.dispatch` works without importing it
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'minilora' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
