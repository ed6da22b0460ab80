"""The training state of a checkpoint without pickles: tensors in safetensors, everything else in JSON.

    training_state.json           the nested state (optimizer groups, counters, RNG states, data
                                  position), each tensor replaced by {"tensor": key}
    training_state.safetensors    the tensors, by key

A pickle runs code when it is loaded, so a checkpoint folder from someone else (a shared output
folder, a downloaded run) could run anything on `--resume`; checksums guard against damage, not
against a crafted file. Reading these two files builds only dicts, lists, tuples, numbers, strings,
tensors and NumPy arrays, whatever they contain.

Every value is tagged, so decoding needs no guessing: {"dict": [[key, value], ...]} (keys may be ints,
as in an optimizer's state), {"tuple": [...]}, {"list": [...]}, {"tensor": key}, {"ndarray": [...],
"dtype": name} (NumPy's RNG state), {"float": "nan"|"inf"|"-inf"} (strict JSON has no such numbers);
ints, finite floats, strings, booleans and null stand for themselves.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minilora.atomic import current_umask

JSON_NAME = "training_state.json"
TENSORS_NAME = "training_state.safetensors"
# NumPy dtypes a state may hold (the Mersenne Twister's key is uint32): nothing else is decoded.
_NDARRAY_DTYPES = ("uint32", "int64", "float64")
_MAX_STATE_BYTES = 64 << 20  # the JSON part is counters and RNG states (~30 KB per rank); more is not ours


class StateFormatError(ValueError):
    """A training state that does not decode: damaged or not written by minilora."""


def _encode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").contiguous().clone()  # a copy: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": value.dtype.name}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, tensors) for v in value]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, (np.integer, np.floating)):
        return _encode(value.item(), tensors)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state: cannot store a {type(value).__name__}")  # a bug in what the loop saves


def _decode(value, tensors: dict[str, torch.Tensor]):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise StateFormatError(f"unexpected value of type {type(value).__name__}")
    if "tensor" in value:
        if value["tensor"] not in tensors:
            raise StateFormatError(f"no tensor {str(value['tensor'])[:40]!r}")
        return tensors[value["tensor"]]
    if "ndarray" in value:
        if value.get("dtype") not in _NDARRAY_DTYPES or not isinstance(value["ndarray"], list):
            raise StateFormatError("an array of an unexpected kind")
        return np.array(value["ndarray"], dtype=value["dtype"])
    if "float" in value:
        if value["float"] not in ("nan", "inf", "-inf"):
            raise StateFormatError("an unexpected float")
        return float(value["float"])
    for tag, kind in (("tuple", tuple), ("list", list)):
        if tag in value and isinstance(value[tag], list):
            return kind(_decode(v, tensors) for v in value[tag])
    if "dict" in value and isinstance(value["dict"], list):
        if not all(isinstance(p, list) and len(p) == 2 for p in value["dict"]):
            raise StateFormatError("a malformed mapping")
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["dict"]}
    raise StateFormatError(f"an unknown tag {str(next(iter(value)))[:40]!r}")


def save_state(state: dict, folder: Path) -> None:
    """Write the two files of `state` into `folder` (a checkpoint being built: atomicity is the caller's)."""
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(state, tensors)
    save_file(tensors, str(folder / TENSORS_NAME), metadata={"format": "pt"})
    os.chmod(folder / TENSORS_NAME, 0o666 & ~current_umask())  # safetensors creates it 0600; the umask decides
    (folder / JSON_NAME).write_text(json.dumps(body, allow_nan=False), encoding="utf-8")


def load_state(folder: Path) -> dict:
    """The state written by save_state; StateFormatError (naming the file) if it does not decode."""
    path = folder / JSON_NAME
    try:
        if path.stat().st_size > _MAX_STATE_BYTES:
            raise StateFormatError(f"{path.stat().st_size:,} bytes, more than a training state holds")
        body = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
        tensors = load_file(str(folder / TENSORS_NAME))
        state = _decode(body, tensors)
    except (OSError, UnicodeDecodeError, SafetensorError, RecursionError, ValueError, TypeError) as err:
        raise StateFormatError(f"{path}: not a training state minilora wrote ({type(err).__name__}: "
                               f"{str(err)[:200]})") from None
    if not isinstance(state, dict):
        raise StateFormatError(f"{path}: not a training state minilora wrote (not a mapping)")
    return state


def _refuse_constant(name: str):
    raise ValueError(f"bare {name} is not JSON")
