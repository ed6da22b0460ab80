"""Load a causal LM's base from its safetensors files tensor by tensor, quantizing each linear layer as it is read.

    config.json ─► the model on the meta device (no memory) ─► LoRA targets and init checked on it
    file headers ─► each tensor's place in the model (transformers' key renaming), all checked before a read
    then in module order, decoder layer after decoder layer:
        module's tensors read ─► [LoRA init from the full-precision weight] ─► 4-bit layer ─► put in place
        the input embeddings complete ─► on the device, frozen ─► on_embeddings(module)   (not tied to the head)
        a decoder layer complete ─► moved to the device, frozen but LoRA ─► on_layer(index, layer)

The host holds the model loaded so far (4-bit linears; embeddings, norms and the output head in the compute
dtype) and one linear layer in full precision (the memory freed is handed back to the OS after each decoder
layer, minilora/heap.py), not the whole model in the compute dtype as transformers'
from_pretrained does before minilora could quantize. The result is the one from_pretrained + add_lora +
quantize_linears gives (tests/test_stream_load.py): the same modules, bytes, buffers and config. Like
from_pretrained: each tensor is cast to its parameter's dtype, tied weights are tied when the checkpoint
stores one of them (or both, equal), non-persistent buffers (rotary `inv_freq`) are computed by the model's
own `_init_weights`, the generation config is read, the model is left in eval mode (its LoRA layers, made
after, in training mode, as add_lora made them). Unlike it, no
`kernels` hub layers are swapped in: its default mapping has none for a model on the CPU, where
from_pretrained built the model minilora then quantized.

Checkpoints this loader does not read go through from_pretrained (returns None, with a warning saying why):
no safetensors weights (`pytorch_model.bin`), tensors transformers converts on load (split or merged
weights), and modules a model keeps in fp32 at this compute dtype. A stored tensor that fits nowhere in the
model, a shape that differs, or a weight the model needs and the checkpoint lacks is a UserError.
"""

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from minilora.errors import UserError
from minilora.heap import return_freed_memory
from minilora.inject import LoRAPlan, lora_parameters, plan_lora
from minilora.model_files import model_file, resolve_model_path, unloadable_model
from minilora.safetensors_reader import StoredTensor, TensorReader, read_headers
from minilora.training.recompute import decoder_layers

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"  # transformers' names, in its order


def load_streaming(name_or_path: str, compute_dtype: torch.dtype, device: torch.device, quantizer=None,
                   lora: dict | None = None, on_layer: Callable[[int, nn.Module], None] | None = None,
                   on_embeddings: Callable[[nn.Module], None] | None = None) -> nn.Module | None:
    """The model `name_or_path` (a folder, a hub id, `builtin:...`) with every linear layer but the output head
    given to `quantizer` (minilora.quant.Quantizer; None keeps them in full precision) and LoRA per `lora`
    (add_lora's keyword arguments), everything on `device`, frozen but the LoRA parameters, in eval mode but the
    LoRA layers (as from_pretrained and then add_lora left them).

    `on_layer(index, layer)` is called for each decoder layer, in order, as soon as all its tensors are
    loaded (quantized, LoRA in place, on the device, frozen): a caller may shard or offload it there, before
    the next layer is read. `on_embeddings(module)` likewise for the input embeddings, before any layer is
    read, unless they are tied to the head (embeddings_tied). A module handed over is the caller's: the loader
    does not touch it again.
    None where the checkpoint is not one this loader reads (see the module docstring).
    A config, header or file that cannot be read is a UserError naming the model.
    """
    path = resolve_model_path(name_or_path)
    try:  # the model's files are input: each way they can be damaged raises its own exception type
        model = skeleton(path, compute_dtype)  # first: a hub id's config is fetched before its weights
        files = safetensors_files(path)
        if files is None:
            return _not_streamed(path, "no model.safetensors or model.safetensors.index.json")
        stored = read_headers(files)
        generation_config = _generation_config(model, path)
    except Exception as err:
        raise unloadable_model(name_or_path, err) from err
    if _keeps_fp32(model, compute_dtype):
        return _not_streamed(path, f"{type(model).__name__} keeps some modules in fp32 at {compute_dtype}")
    sources, converted = place_tensors(model, stored, name_or_path)
    if converted:
        return _not_streamed(path, f"tensor {converted[0]} is converted by transformers on load")
    plan = plan_lora(model, **lora, quantizer=quantizer) if lora is not None else None
    model.eval()  # from_pretrained's mode, before LoRA: its layers are made in training mode, as add_lora made them
    _compute_buffers(model)
    with TensorReader() as reader:
        _Loader(model, stored, sources, reader, device, quantizer, plan, on_layer, on_embeddings, name_or_path).run()
    if quantizer is not None:
        model.is_loaded_in_4bit = True  # how transformers marks 4-bit models; PEFT reads it too
    model.generation_config = generation_config
    return model


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the input embeddings and the output head are one tensor (tied): neither can be handed over
    (sharded, offloaded) without the other. A skeleton is tied as its config says; the loader unties a pair the
    checkpoint stores with different values, as from_pretrained does, so a pair tied at the start of a load
    may be untied at its end."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def safetensors_files(path: str) -> list[Path] | None:
    """The checkpoint's safetensors files (fetched for a hub id), as from_pretrained looks for them: one
    `model.safetensors`, else the shards an index names. None where there are none."""
    single = model_file(path, SINGLE_FILE)
    if single is not None:
        return [single]
    index = model_file(path, INDEX_FILE)
    if index is None:
        return None
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = []
    for shard in shards:
        found = model_file(path, shard) if "/" not in shard and "\\" not in shard and shard != ".." else None
        if found is None:
            raise UserError(f"base model {path}: {INDEX_FILE} names the shard {shard!r}, which is not there")
        files.append(found)
    return files


def skeleton(path: str, compute_dtype: torch.dtype) -> nn.Module:
    """The model from its config on the meta device, its parameters created in the compute dtype (as
    from_pretrained creates them), and its config named as from_pretrained names it."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    model.config.name_or_path = path
    return model


def place_tensors(model: nn.Module, stored: dict[str, StoredTensor], label: str) -> tuple[dict[str, str], list[str]]:
    """({model key: checkpoint key} for every tensor of the model's state dict, [checkpoint keys transformers
    would convert]). Keys are renamed by transformers' own rules (its legacy names, a base-model prefix added
    or removed), tied weights resolved as from_pretrained resolves them. UserError for a stored tensor that
    fits nowhere, a shape that differs, a weight nowhere in the checkpoint."""
    wanted = model.state_dict()  # meta tensors: names, shapes and dtypes only
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    sources, converted, unplaced = {}, [], []
    for key in stored:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
        if name not in wanted and key in wanted:  # from_pretrained's rule: a renaming must not move a fitting key
            name, pattern = rename_source_key(key, [], [], model.base_model_prefix, wanted)
        if pattern is not None:
            converted.append(key)
        elif name in wanted:
            if name in sources:
                raise UserError(f"base model {label}: checkpoint tensors {sources[name]} and {key} are both {name}")
            sources[name] = key
        elif not _ignored_on_load(model, key):
            unplaced.append(key)
    if unplaced:
        raise UserError(f"base model {label}: the checkpoint has {len(unplaced)} tensor(s) that "
                        f"{type(model).__name__} has no place for ({', '.join(sorted(unplaced)[:3])}); "
                        "it is not a checkpoint of this config")
    for name, key in sources.items():
        if tuple(stored[key].shape) != tuple(wanted[name].shape):
            raise UserError(f"base model {label}: checkpoint tensor {key} is {list(stored[key].shape)}, "
                            f"but {name} is {list(wanted[name].shape)} in this config")
    _resolve_ties(model, sources)
    missing = [name for name in wanted if name not in sources and name not in model.all_tied_weights_keys]
    if missing:
        raise UserError(f"base model {label}: the checkpoint lacks {len(missing)} weight(s) of {type(model).__name__} "
                        f"({', '.join(missing[:3])})")
    return sources, converted


def _resolve_ties(model: nn.Module, sources: dict[str, str]) -> None:
    """from_pretrained's tying (`tie_weights` with the missing keys): a tied target the checkpoint lacks is
    tied to its source; a source it lacks is read from the target's tensor; when it has both, they stay
    tied only if equal (checked as they load). `model.all_tied_weights_keys`: {target: source}, filled by
    transformers only where the config ties (`tie_word_embeddings`)."""
    for target, source in list(model.all_tied_weights_keys.items()):
        if source not in sources and target in sources:
            sources[source] = sources.pop(target)


def _ignored_on_load(model: nn.Module, key: str) -> bool:
    """Stored tensors from_pretrained skips without a word (`_adjust_missing_and_unexpected_keys`): the
    model's `_keys_to_ignore_on_load_unexpected` (GPT-NeoX's old `attention.bias` masks), and rotary
    `inv_freq` and `position_ids` that older checkpoints stored and are now computed buffers."""
    patterns = set(model._keys_to_ignore_on_load_unexpected or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return any(re.search(p, key) for p in patterns)


def _keeps_fp32(model: nn.Module, compute_dtype: torch.dtype) -> bool:
    """Whether from_pretrained would load some modules in fp32 at this dtype (its `_get_dtype_plan`)."""
    return bool((model._keep_in_fp32_modules and compute_dtype == torch.float16)
                or (model._keep_in_fp32_modules_strict and compute_dtype in (torch.float16, torch.bfloat16)))


@torch.no_grad()
def _compute_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary `inv_freq`) are not in a checkpoint: give them CPU memory and let the
    model's `_init_weights` compute them, as from_pretrained does (empty_like, then the init of every module
    it did not load). Done before any weight is read, so an init that also touches the module's parameters
    writes only meta tensors."""
    for module in model.modules():
        names = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
        if names:
            for name in names:
                module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
            model._init_weights(module)


class _Loader:
    """One pass over the model's modules in their order, reading each one's tensors and building it."""

    def __init__(self, model: nn.Module, stored: dict[str, StoredTensor], sources: dict[str, str],
                 reader: TensorReader, device: torch.device, quantizer, plan: LoRAPlan | None,
                 on_layer: Callable[[int, nn.Module], None] | None,
                 on_embeddings: Callable[[nn.Module], None] | None, name_or_path: str):
        self.model, self.stored, self.sources, self.reader = model, stored, sources, reader
        self.device, self.quantizer, self.plan, self.on_layer = device, quantizer, plan, on_layer
        self.on_embeddings = on_embeddings if not embeddings_tied(model) else None
        self.handed: set[int] = set()  # ids of the modules given to on_embeddings and their children: the caller's
        self.name_or_path = name_or_path
        self.targets = set(plan.names) if plan is not None else set()
        self.head = model.get_output_embeddings()
        self.layers = decoder_layers(model)
        self.layers_name = next(name for name, m in model.named_modules() if m is self.layers)

    def run(self) -> None:
        # Module names only: holding the modules would keep each full-precision linear alive after its
        # 4-bit layer replaced it.
        owners = [name for name, m in self.model.named_modules() if any(True for _ in _state_names(m))]
        left = {i: sum(1 for n in owners if self._layer_of(n) == i) for i in range(len(self.layers))}
        for name in owners:
            self._load_module(name)
            index = self._layer_of(name)
            if index is None:  # the embeddings, the final norm, the head
                module = self.model.get_submodule(name)
                holds_layers = any(m is self.layers for m in module.modules())
                _move(module, self.device, own_only=holds_layers)
                _freeze_but_lora(module, own_only=holds_layers)
                if self.on_embeddings is not None and module is self.model.get_input_embeddings():
                    self.handed.update(id(m) for m in module.modules())
                    self.on_embeddings(module)
                    return_freed_memory()
                continue
            left[index] -= 1
            if left[index] == 0:
                layer = self.layers[index]
                _move(layer, self.device)
                _freeze_but_lora(layer)
                if self.on_layer is not None:
                    self.on_layer(index, layer)
                return_freed_memory()  # the layer's full-precision tensors (and, sharded, its whole tensors)
        # What has no tensor in the checkpoint (the rotary embedding's buffers); the decoder layers are done
        # and may have been sharded by on_layer, the embeddings by on_embeddings: not touched again.
        for name, module in self.model.named_modules():
            if self._layer_of(name) is None and module is not self.layers and id(module) not in self.handed:
                _move(module, self.device, own_only=True)

    def _layer_of(self, name: str) -> int | None:
        prefix = self.layers_name + "."
        return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None

    def _load_module(self, name: str) -> None:
        module = self.model.get_submodule(name)
        for key in _state_names(module):
            full = f"{name}.{key}" if name else key
            setattr_tensor(module, key, self._tensor(full, getattr(module, key)), key in module._parameters)
        built = self._build(name, module)
        if built is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, built)

    def _tensor(self, full: str, empty: torch.Tensor) -> torch.Tensor:
        """The model's tensor `full`, read and cast to its dtype (from_pretrained's rule: the dtype the
        parameter was created in), on the CPU; or the tensor it is tied to."""
        source = self.model.all_tied_weights_keys.get(full)
        tied_to = self.model.get_parameter(source) if source is not None else None
        if tied_to is not None and tied_to.is_meta:
            raise UserError(f"base model {self.name_or_path}: {full} is tied to {source}, which comes after it in "
                            "the model")
        if full not in self.sources:
            return tied_to
        try:
            value = self.reader.read(self.stored[self.sources[full]]).to(empty.dtype)
        except OSError as err:  # a file changed or cut short since its header was checked
            raise unloadable_model(self.name_or_path, err) from err
        if tied_to is not None:
            if torch.equal(value, tied_to.detach().to(value.device)):
                return tied_to
            del self.model.all_tied_weights_keys[full]  # both stored and different: from_pretrained unties them
        return value

    def _build(self, name: str, module: nn.Module) -> nn.Module:
        """What takes the module's place: its LoRA layer (a target), its 4-bit layer (any other linear layer
        but the output head, with a quantizer), or itself."""
        if name in self.targets:
            return self.plan.build(name, module)
        if self.quantizer is not None and type(module) is nn.Linear and module is not self.head:
            return self.quantizer(module)
        return module


def _move(module: nn.Module, device: torch.device, own_only: bool = False) -> None:
    """Onto the device: the whole module, or only its own tensors (a module holding modules not loaded yet).
    Parameters keep their identity, so tied weights stay tied."""
    if not own_only:
        if any(t.device != device for t in [*module.parameters(), *module.buffers()]):
            module.to(device)
        return
    for key, b in module._buffers.items():
        if b is not None and b.device != device:
            module._buffers[key] = b.to(device)
    for p in module._parameters.values():
        if p is not None and p.device != device:
            p.data = p.data.to(device)


def _freeze_but_lora(module: nn.Module, own_only: bool = False) -> None:
    """What add_lora and load_base did to the whole model: everything frozen, then the LoRA parameters thawed
    (`own_only`: only the module's own parameters, for a module holding modules not loaded yet)."""
    if own_only:
        for p in module._parameters.values():
            if p is not None:
                p.requires_grad_(False)
        return
    module.requires_grad_(False)
    for p in lora_parameters(module):
        p.requires_grad_(True)


def _state_names(module: nn.Module):
    """The module's own tensors that a checkpoint holds: parameters and persistent buffers."""
    for key, p in module._parameters.items():
        if p is not None:
            yield key
    for key, b in module._buffers.items():
        if b is not None and key not in module._non_persistent_buffers_set:
            yield key


def setattr_tensor(module: nn.Module, key: str, value: torch.Tensor, is_parameter: bool) -> None:
    if is_parameter:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        module._parameters[key] = value
    else:
        module._buffers[key] = value


def _generation_config(model: nn.Module, path: str):
    """As from_pretrained reads it (`adjust_generation_fn`): generation_config.json, else one made from
    config.json."""
    if not model.can_generate():
        return model.generation_config
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_pretrained(path, config_file_name="config.json", _from_model_config=True)


def _not_streamed(path: str, why: str) -> None:
    warnings.warn(f"base model {path}: loaded by transformers' from_pretrained, the whole model in memory before "
                  f"it is quantized ({why})", stacklevel=3)
    return None
