"""One torchrun rank of `python -m benchmarks.fsdp --run`: train.py as it is, with this process's memory written to
`<folder>/rank<RANK>.json`.

    torchrun --nproc-per-node N -m benchmarks.fsdp_rank FOLDER train.py --data ... [train.py's flags]

    peak_rss    VmHWM, the kernel's high-water mark of the process's resident memory from the load on (load,
                training and saving; the imports' memory is resident throughout), read after train.py returns or fails
    load_peak   the high-water mark while train.py's build_model runs (the base loaded, quantized, given LoRA and,
                under --fsdp, sharded layer by layer), above the resident memory when it started: VmHWM is reset
                through /proc/self/clear_refs right before, so no short spike is missed
    load_held   what the model holds on this rank once loaded: its parameters and buffers (a sharded one counts
                this rank's shard) and the 4-bit weights' statistics
    load_shard  this rank's shard of the model: load_held, but with each parameter still whole under FSDP (those
                the root group shards at the first step: the final norm and the head) counted at the size of the
                shard FSDP2 will keep (dim 0 split in `world` parts, rounded up). Without FSDP, load_held. The
                load's budget is this plus three decoder layers in the compute dtype

build_model is wrapped, not changed: the measurement reads /proc around the call train.py makes.
"""

import json
import math
import os
import runpy
import sys
from pathlib import Path

from bitsandbytes.nn import Params4bit
from torch import nn
from torch.distributed.tensor import DTensor

import minilora.training.job as job
from minilora.fsdp_nf4 import NF4Shard, base_bytes

from .load_memory import proc_status


def held_bytes(model: nn.Module, world: int = 1) -> int:
    """This rank's bytes of `model`: the 4-bit weights as base_bytes counts them (packed codes + statistics, a
    shard where FSDP sharded them), every other parameter and buffer by its local part, each storage once.
    `world` > 1 in a model FSDP has sharded in part: a parameter not sharded yet counts as its coming shard."""
    seen, total = set(), base_bytes(model).local
    params = {id(p) for p in model.parameters()}
    sharding = world > 1 and any(isinstance(p, DTensor) for p in model.parameters())
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        if isinstance(local, (NF4Shard, Params4bit)):
            continue  # counted by base_bytes
        key = local.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        if sharding and id(t) in params and not isinstance(t, DTensor) and t.dim() > 0:
            total += math.ceil(t.shape[0] / world) * (t.numel() // t.shape[0]) * t.element_size()
        else:
            total += local.untyped_storage().nbytes()
    return total


measured: dict = {}  # this rank's load measurements, filled by the wrapped build_model


def measured_build(build):
    def build_model(*args, **kwargs):
        start = proc_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
        model, record = build(*args, **kwargs)
        measured["load_peak"] = proc_status("VmHWM") - start
        measured["load_held"] = held_bytes(model)
        measured["load_shard"] = held_bytes(model, int(os.environ.get("WORLD_SIZE", "1")))
        return model, record

    return build_model


def main() -> None:
    folder, script, *train_args = sys.argv[1:]
    sys.argv = [script, *train_args]
    rank = int(os.environ.get("RANK", "0"))
    job.build_model = measured_build(job.build_model)
    try:
        runpy.run_path(script, run_name="__main__")  # train.py ends in sys.exit: the finally still runs
    finally:
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss": proc_status("VmHWM"),
                                                                **measured}))


if __name__ == "__main__":
    main()
