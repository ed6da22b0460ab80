"""Tensors of safetensors files, read one at a time into memory the process owns.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then
the data, its offsets counted from the end of the header.

Why plain reads and not a memory map (safetensors' `safe_open`, which transformers' from_pretrained uses):
every page of a mapped file that a copy touches stays resident in the process until the map closes, so
the process's resident memory grows by the whole checkpoint while it loads even though it keeps only the
quantized result, and a memory limit (a container's, a scheduler's) counts it. A read into a tensor we
allocate costs one copy, as the map does, and what is resident is exactly what we hold: the tensor being
quantized. The file's pages go to the kernel's page cache, which it reclaims under pressure.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# The format's dtype names (safetensors' Dtype enum) -> torch.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: `nbytes` bytes at `offset` from the start of `file`."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_headers(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor of the files by name. The safetensors library first checks each file (header JSON,
    known dtypes, offsets that cover the data exactly and lie within the file) and raises its
    SafetensorError on a damaged one; a name in two files raises ValueError."""
    stored: dict[str, StoredTensor] = {}
    for file in files:
        with safe_open(file, framework="pt"):  # validation only: no tensor is read through the map
            pass
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        data_start = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in stored:
                raise ValueError(f"tensor {name} is in both {stored[name].file.name} and {file.name}")
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{file.name}: tensor {name} has dtype {info['dtype']}, which minilora does not read")
            begin, end = info["data_offsets"]
            stored[name] = StoredTensor(file, DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin,
                                        end - begin)
    return stored


class TensorReader:
    """`with TensorReader() as reader: t = reader.read(stored)`: each file opened once, unbuffered, so a read
    goes straight from the file into the tensor's memory."""

    def __init__(self):
        self._handles = {}

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        return False

    def read(self, stored: StoredTensor) -> torch.Tensor:
        """The tensor, on the CPU, in its stored dtype and shape (a fresh allocation of exactly its size)."""
        handle = self._handles.get(stored.file)
        if handle is None:
            handle = self._handles[stored.file] = open(stored.file, "rb", buffering=0)
        raw = torch.empty(stored.nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        handle.seek(stored.offset)
        done = 0
        while done < stored.nbytes:  # one read returns at most ~2 GiB on Linux
            got = handle.readinto(view[done:])
            if not got:
                raise OSError(f"{stored.file}: the file ends inside a tensor (read {done} of {stored.nbytes} bytes)")
            done += got
        return raw.view(stored.dtype).reshape(stored.shape)
