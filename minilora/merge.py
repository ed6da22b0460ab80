"""Fold a LoRA adapter into its base and export a plain Hugging Face model (no PEFT, no 4-bit).

    adapter folder ─► base loaded as it was trained (run.json: nf4 / fp4 / none) ─► adapter (strict)
      ─► per LoRA layer: 4-bit W dequantized to fp32, W + scale·B@A in fp32, rounded once to --dtype
         (DoRA layers: m / ||W + scale·B@A||_row · (W + scale·B@A), also in fp32; see minilora/dora.py)
      ─► every other 4-bit layer dequantized to --dtype, everything else cast to --dtype
      ─► LoRALinear replaced by its merged nn.Linear, so keys are the base's own (`...qkv_proj.weight`)
      ─► quantization markers removed from model and config ─► save_pretrained + tokenizer, atomically

The update goes into a dequantized copy, never back into 4-bit: re-quantizing rounds an r=8 update
away almost entirely (most of its entries are smaller than half the gap between neighbouring NF4
levels). The output loads with `AutoModelForCausalLM.from_pretrained` and so with vLLM and other
servers that read Hugging Face folders.

    python -m minilora.merge --adapter out/ --output merged/ [--model NAME] [--dtype bf16|fp16|fp32]
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.utils.hub import convert_file_size_to_int

from minilora.adapted_model import TrainedSetup, check_device, load_trained, resolve_trained
from minilora.adapter import read_adapter_config
from minilora.atomic import atomic_replace_dir
from minilora.cli_runner import run_cli
from minilora.errors import UserError
from minilora.lock import LOCK_NAME, FolderLock
from minilora.lora import LoRALinear, is_4bit, plain_linear
from minilora.quant import is_local_model, resolve_model_path

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UserError(f"dtype {dtype}: expected bf16, fp16 or fp32")
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of bf16, fp16, fp32")
    return DTYPES[dtype]


def check_shard_size(size: str | int) -> None:
    try:
        ok = convert_file_size_to_int(size) > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"--max-shard-size {size!r}: expected a positive size such as 5GB or 500MB")


# --- folding ----------------------------------------------------------------------------------------


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def fold_lora(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Replace every LoRALinear by one nn.Linear holding W + scale·B@A and every other 4-bit layer by
    its dequantized nn.Linear, all in `dtype`; cast the rest of the model to `dtype`. In place.

    Each sum is rounded once (LoRALinear.merge_into_full_precision). Only one layer at a time is held in
    fp32, so the peak is the output model plus one matrix. Returns (LoRA layers merged, other 4-bit layers
    dequantized).
    """
    lora = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in lora:
        layer.merge_into_full_precision(dtype)
        _replace(model, name, layer.base_layer)
    quantized = [(name, m) for name, m in model.named_modules() if is_4bit(m)]
    for name, layer in quantized:
        _replace(model, name, plain_linear(layer, dtype))
    strip_quantization(model)  # no 4-bit layer is left; transformers refuses to cast a model it marks quantized
    model.to(dtype)
    return len(lora), len(quantized)


def strip_quantization(model: nn.Module) -> None:
    """Remove what transformers attaches to a model it quantized on load, so that save_pretrained
    writes a plain checkpoint and a config.json without `quantization_config` (which would make
    from_pretrained quantize again, or expect packed 4-bit tensors)."""
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "_weight_conversions"):
        if attr in model.__dict__:
            delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        if config is not None and getattr(config, "_is_quantized", False):
            config._is_quantized = False


def check_plain(model: nn.Module) -> None:
    """The invariant the export rests on; a failure here is a bug in this module, not the user's."""
    leftover = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) or is_4bit(m)]
    bad_keys = [k for k in model.state_dict() if "lora_" in k or "base_layer" in k]
    if leftover or bad_keys or hasattr(model.config, "quantization_config"):
        raise RuntimeError(f"merge left LoRA/4-bit traces: modules {leftover[:3]}, keys {bad_keys[:3]}")


def check_finite(model: nn.Module, dtype: torch.dtype) -> None:
    """Refuse to write a merged model holding NaN or inf: the adapter is checked when read, so these come from
    the base's own weights or from a sum past the range of `dtype` (fp16 ends at 65,504)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            hint = "; try --dtype bf16 or fp32" if dtype == torch.float16 else ""
            raise UserError(f"the merged weight {name} holds NaN or inf values in "
                            f"{str(dtype).removeprefix('torch.')} (from the base model's weights or an update "
                            f"beyond the dtype's range){hint}; nothing was written")


# --- the whole job ----------------------------------------------------------------------------------


def _check_output(output: Path, adapter_dir: Path, base: str, overwrite: bool) -> None:
    resolved = output.resolve()
    protected = [adapter_dir.resolve()]
    if is_local_model(base):
        protected.append(Path(resolve_model_path(base)).resolve())
    for folder in protected:
        if resolved == folder or resolved in folder.parents:
            raise UserError(f"--output {output} would replace {folder}, which the merge reads; choose another folder")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output {output} exists and is not empty; pass --overwrite to replace it")


def _base_tokenizer(base: str):
    """The base's own tokenizer, unchanged (load_tokenizer would add a pad token); None if it has none."""
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(base))
    except (OSError, ValueError):
        return None


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    model: str | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    quant: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    device: torch.device | str | None = None,
) -> Path:
    """Write `output_dir`: the base with the adapter folded in, as a plain HF model in `dtype`.

    adapter_dir     a PEFT-format adapter folder (minilora's or PEFT's)
    output_dir      the merged model's folder (created; refused if it is the adapter's or not empty)
    model           the base (hub id or folder; default: the adapter config's `base_model_name_or_path`)
    dtype           the merged weights' dtype: torch.bfloat16/float16/float32 or "bf16", "fp16", "fp32"
    quant           how the base is loaded before merging, "nf4", "fp4" or "none" (default: as in the
                    training run's run.json, else nf4), so the merge folds into the weights it trained on
    overwrite       replace a non-empty `output_dir`
    max_shard_size  the largest safetensors shard ("5GB", "500MB" or bytes)
    device          where the base is loaded and merged (default: CUDA if present, else the CPU)
    Returns `output_dir`.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    dtype = parse_dtype(dtype)
    check_shard_size(max_shard_size)  # save_pretrained would refuse it only after the whole merge
    if device is not None:
        check_device(device)  # before the model loads
    config = read_adapter_config(adapter_dir)
    setup = resolve_trained(adapter_dir, model, quant)
    base = setup.base
    with FolderLock(output_dir.parent / f".{output_dir.name}{LOCK_NAME}", f"--output {output_dir}"):
        _check_output(output_dir, adapter_dir, base, overwrite)
        n_lora, n_other, tokenizer = _merge_into(output_dir, setup, adapter_dir, dtype, max_shard_size, device)
    _print_summary(output_dir, base, setup.quant, setup.quant_source, dtype, n_lora, n_other, config, tokenizer)
    return output_dir


def _merge_into(output_dir: Path, setup: TrainedSetup, adapter_dir: Path, dtype: torch.dtype,
                max_shard_size: str | int, device) -> tuple[int, int, object]:
    base = setup.base
    tokenizer = _base_tokenizer(base)
    net = load_trained(setup, adapter_dir, device)
    n_lora, n_other = fold_lora(net, dtype)
    check_plain(net)
    check_finite(net, dtype)
    net.config.dtype = dtype
    # load_base switches the KV cache off for training; the export carries the base's own setting.
    net.config.use_cache = getattr(AutoConfig.from_pretrained(resolve_model_path(base)), "use_cache", True)

    def build(folder: Path) -> None:
        net.save_pretrained(folder, max_shard_size=max_shard_size)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    atomic_replace_dir(build, output_dir)
    return n_lora, n_other, tokenizer


def _human(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def _print_summary(output: Path, base: str, quant: str, quant_source: str, dtype: torch.dtype, n_lora: int,
                   n_other: int, config: dict, tokenizer) -> None:
    shards = sorted(output.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    base_kind = "full precision" if quant == "none" else f"{quant} dequantized"
    print(f"merged: {n_lora} LoRA layers (r={config['r']}, alpha={config['lora_alpha']:g}) into {base} "
          f"[{base_kind}; quant {quant_source}]; {n_other} other 4-bit layers dequantized")
    print(f"wrote {output}/: {str(dtype).removeprefix('torch.')}, {_human(size)} in {len(shards)} "
          f"safetensors file{'s' if len(shards) != 1 else ''} + config.json"
          + (" + tokenizer" if tokenizer is not None else ""))
    if tokenizer is None:
        print(f"note: no tokenizer found for {base}; copy one into {output}/ before serving", file=sys.stderr)
    print("load it with (no PEFT, no bitsandbytes needed):")
    print(f"  model = AutoModelForCausalLM.from_pretrained({str(output)!r})")
    print(f"  vllm serve {output}")


# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minilora.merge",
        description="Fold a LoRA adapter into its (dequantized) base and write a plain Hugging Face model.",
    )
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + safetensors)")
    parser.add_argument("--output", required=True, help="folder for the merged model (written atomically)")
    parser.add_argument("--model", help="base model (default: base_model_name_or_path of the adapter config)")
    parser.add_argument("--dtype", default="bf16", help="dtype of the merged weights: bf16 (default), fp16 or fp32")
    parser.add_argument("--quant", help="how the base was quantized in training: nf4, fp4 or none "
                                        "(default: from the run's run.json, else nf4)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument("--device", help="where to merge (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = parse_dtype(args.dtype)  # before any model is loaded
    merge_adapter(args.adapter, args.output, model=args.model, dtype=dtype, quant=args.quant,
                  overwrite=args.overwrite, max_shard_size=args.max_shard_size, device=args.device)
    return 0


def cli() -> None:
    """Console entry point: every failure is one `error:` line and an exit code (minilora/cli_runner.py)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
