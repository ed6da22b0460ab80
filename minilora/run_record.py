"""run.json, the record of a training run: the resolved config, precision and compute dtype, versions,
data, and at the end the results. The training job writes it next to the adapter; generate and merge
read it back to load the base exactly as the adapter was trained. This module owns its layout.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from minilora.atomic import atomic_write_json
from minilora.errors import UserError
from minilora.recipe import QUANT_TYPES

RUN_FILE = "run.json"
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def write_run_record(output: str | Path, record: dict) -> Path:
    path = Path(output) / RUN_FILE
    atomic_write_json(path, record)
    return path


def read_run_record(output: str | Path) -> dict | None:
    """The run.json in `output`, or None if there is none or it cannot be read as a JSON object."""
    try:
        record = json.loads((Path(output) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def find_run_record(adapter_dir: str | Path) -> Path | None:
    """run.json of the training run that wrote `adapter_dir`: the final adapter sits next to it,
    a checkpoint's adapter two levels below it (`<run>/checkpoints/step-N/`)."""
    folder = Path(adapter_dir)
    candidates = [folder / RUN_FILE]
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent / RUN_FILE)
    return next((p for p in candidates if p.is_file()), None)


@dataclass(frozen=True)
class TrainedBase:
    """How the base was loaded in training. Both the quantization and the compute dtype decide the
    dequantized weights the adapter learned against (loading in bf16 rounds W before its absmax is
    taken), so reloading with them reproduces those weights exactly. The defaults (no run.json) are
    QLoRA's nf4 + double quant and the device's own compute dtype."""

    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None  # "bfloat16", "float16", "float32"; None: the device's default
    source: str = "default"  # the run.json read, or "default"


def read_trained_base(adapter_dir: str | Path) -> TrainedBase:
    path = find_run_record(adapter_dir)
    if path is None:
        return TrainedBase()
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{path}: not readable as JSON ({str(err)[:200]}); pass --quant to say how the base was "
                        "loaded") from err
    config = run.get("config") if isinstance(run, dict) else None
    quant = config.get("quant") if isinstance(config, dict) else None
    if not isinstance(quant, str) or quant not in QUANT_TYPES:
        return TrainedBase()
    dtype = str(run.get("compute_dtype", "")).removeprefix("torch.")
    return TrainedBase(quant=quant, double_quant=run.get("double_quant", True) is not False, source=str(path),
                       compute_dtype=dtype if dtype in COMPUTE_DTYPES else None)
