"""Checkpoints of an --fsdp run: every rank writes its shards of the LoRA weights and AdamW state.

    <output>/checkpoints/step-N/
        sharded/          torch.distributed.checkpoint in safetensors files, one per rank (each tensor's
                          offset in the whole one in the file's JSON header: no pickled metadata); only
                          LoRA weights and their AdamW moments and step counts, never the base
        adapter_config.json, adapter_model.safetensors   the whole adapter at step N (PEFT-loadable)
        training_state.json, training_state.safetensors  step, data position, grad scaler, evaluations,
                          RNG states per rank, the world size (state_io.py)
        manifest.json     format "fsdp-sharded", the run's fingerprint, a sha256 of each file above

All ranks write into one staging folder (the output folder must be shared by all hosts); rank 0 then
adds the manifest and renames the folder into place (minilora.atomic), so after a `kill -9` every
`step-N` is complete. DCP reads each rank's part back whatever the number of ranks (a 2-rank checkpoint
resumes on 1 rank). The one-process and DDP checkpoints (checkpoint.py) are unchanged; the manifest's
`format` tells the two apart.
"""

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from minilora.adapter import save_adapter
from minilora.atomic import atomic_replace_dir
from minilora.inject import lora_layers
from minilora.training.checkpoint import checkpoints_dir, list_checkpoints, write_manifest
from minilora.training.fsdp import gathered_adapter
from minilora.training.recompute import canonical_name
from minilora.training.state_io import save_state

SHARDED_FORMAT = "fsdp-sharded"
SHARDS_DIR = "sharded"


def sharded_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """{key: tensor} of everything a sharded checkpoint holds, by module paths without recompute wrappers
    (the same keys whatever --recompute is): `lora.<path>.<param>` and `adamw.<path>.<param>.<state>`.
    The tensors are the live ones (DCP loads into them in place)."""
    owner = {id(p): f"{canonical_name(path)}.{name}" for path, layer in lora_layers(model).items()
             for name, p in layer.adapter_params().items()}
    tensors = {f"lora.{owner[id(p)]}": p.detach() for p in _params(optimizer)}
    _init_adamw_state(optimizer)
    for p in _params(optimizer):
        for name, value in optimizer.state[p].items():
            tensors[f"adamw.{owner[id(p)]}.{name}"] = value
    return tensors


def _params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _init_adamw_state(optimizer) -> None:
    """AdamW's per-weight state as its first step creates it (torch.optim.adamw._init_group), zeros: a
    fresh optimizer has none, and DCP loads into existing tensors."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if p not in optimizer.state or not optimizer.state[p]:
                step = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def save_sharded_checkpoint(output: str | Path, step: int, model, optimizer, state: dict, fingerprint: dict,
                            keep: int) -> Path:
    """Collective. Write checkpoints/step-<step>/ (see the module docstring) and keep the newest `keep`."""
    target = checkpoints_dir(output) / f"step-{step}"
    staging = checkpoints_dir(output) / f".step-{step}.sharded.tmp"  # matched by the leftovers' `.step-*.tmp`
    main = dist.get_rank() == 0
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save(sharded_tensors(model, optimizer),
             storage_writer=HuggingFaceStorageWriter(str(staging / SHARDS_DIR), save_distributed=True))
    with gathered_adapter(model):  # collective: every rank joins the all-gathers, rank 0 writes
        if main:
            save_adapter(model, staging, fingerprint.get("model"))
    dist.barrier()  # every rank's shards are written
    if main:
        save_state({**state, "step": step, "world": dist.get_world_size()}, staging)

        def build(folder: Path) -> None:
            for item in staging.iterdir():
                shutil.move(str(item), folder / item.name)
            write_manifest(folder, step, fingerprint, SHARDED_FORMAT)

        atomic_replace_dir(build, target)
        shutil.rmtree(staging, ignore_errors=True)
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return target


def load_sharded_tensors(folder: Path, model, optimizer) -> None:
    """Collective. The LoRA weights and AdamW state of `folder` into the live (sharded) tensors."""
    dcp.load(sharded_tensors(model, optimizer), storage_reader=HuggingFaceStorageReader(str(folder / SHARDS_DIR)))
