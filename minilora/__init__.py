"""minilora: QLoRA fine-tuning from the ground up.

    model = minilora.load_base("microsoft/Phi-3-mini-4k-instruct")   # NF4 + double quant
    minilora.add_lora(model, r=8, alpha=16, dropout=0.05)            # the seed card's targets
    minilora.print_trainable(model)
    ...
    minilora.save_adapter(model, "out/")                             # PEFT's format

Generation and merging live in their modules (also command lines: `python -m minilora.generate`,
`python -m minilora.merge`): `from minilora.generate import generate`, `from minilora.merge import
merge_adapter`.
"""

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes logs a warning that an optional hub kernel package
# is missing. It concerns a CPU inference path we switch off (see quant.py); keep the console clean.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from minilora.adapter import load_adapter, read_adapter_config, save_adapter
from minilora.errors import AdapterError, DataError, UserError
from minilora.inject import (
    DEFAULT_TARGETS,
    add_lora,
    count_parameters,
    disable_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    print_trainable,
    set_adapter_enabled,
    set_kernel_mode,
    trainable_summary,
    unmerge_lora,
)
from minilora.lora import LoRALinear
from minilora.quant import load_base, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGETS", "AdapterError", "DataError", "LoRALinear", "UserError",
    "add_lora", "count_parameters", "disable_adapter", "load_adapter", "load_base", "load_tokenizer",
    "lora_layers", "lora_parameters", "merge_lora", "print_trainable", "read_adapter_config",
    "save_adapter", "set_adapter_enabled", "set_kernel_mode", "trainable_summary", "unmerge_lora",
]
