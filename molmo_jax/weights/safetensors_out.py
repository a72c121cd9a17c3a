"""Writing safetensors shards one tensor at a time.

Every key, shape and dtype is known before the first byte is written, so the shards are planned up
front (bounded size, keys in production order) and each shard's header goes out first; tensors are
then appended as they are produced and only one of them is ever in memory.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np

from molmo_jax.weights.errors import WeightsError

NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses them; KiB/MiB/GiB binary)."""
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise WeightsError(f"cannot read the size {text!r} (examples: 5GB, 500MB, 2GiB)") from None
    if value < 1:
        raise WeightsError(f"size {text!r} must be positive")
    return int(value)


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def plan_shards(entries, max_bytes: int) -> list[list[tuple]]:
    """Split (key, shape, dtype) entries, in order, into shards of at most `max_bytes` of tensor data
    (a tensor larger than that gets a shard of its own)."""
    shards, current, size = [], [], 0
    for entry in entries:
        n = nbytes(entry[1], entry[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current:
        shards.append(current)
    return shards


def _header(entries, metadata) -> bytes:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key, shape, dtype in entries:
        n = nbytes(shape, dtype)
        header[key] = {"dtype": NAMES[np.dtype(dtype).name], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the tensor data 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes planned shards into `directory` (file names given); `write(key, array)` must follow the
    planned order. Use as a context manager: on leaving, every planned tensor must have been written."""

    def __init__(self, directory, shards: list[list[tuple]], file_names: list[str], metadata=None):
        if sys.byteorder != "little":
            raise WeightsError("safetensors data is little-endian; writing it from a big-endian host is not supported")
        self.dir = pathlib.Path(directory)
        self.queue = [(name, entries) for name, entries in zip(file_names, shards)]
        self.metadata = metadata
        self.file = None
        self.pending: list[tuple] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def _next_file(self):
        name, entries = self.queue.pop(0)
        self.file = open(self.dir / name, "wb")
        self.file.write(_header(entries, self.metadata))
        self.pending = list(entries)
        for key, shape, dtype in entries:
            self.weight_map[key] = name
            self.total_size += nbytes(shape, dtype)

    def write(self, key: str, array: np.ndarray):
        if not self.pending:
            if self.file:
                self.file.close()
            if not self.queue:
                raise WeightsError(f"internal: tensor {key!r} was not planned")
            self._next_file()
        want_key, shape, dtype = self.pending.pop(0)
        if key != want_key or tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise WeightsError(f"internal: expected {want_key!r} {tuple(shape)} {np.dtype(dtype).name}, got "
                               f"{key!r} {tuple(array.shape)} {array.dtype.name}")
        self.file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if self.file:
            self.file.close()
        if exc_type is None and (self.pending or self.queue):
            left = [e[0] for e in self.pending] + [e[0] for _, es in self.queue for e in es]
            raise WeightsError(f"internal: {len(left)} planned tensors were not written ({left[0]}, ...)")
        return False

    def write_index(self):
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
