"""Reading PyTorch-side checkpoints tensor by tensor: the one reader of every format.

Shapes and dtypes come from the file headers before any tensor data is read, so a whole checkpoint
is validated before anything is converted or written, and conversion holds one tensor (or one
layer's few) in memory, never the model.

* safetensors (one file, or shards + `model.safetensors.index.json`): through the safetensors
  library (`safe_open`), which checks each header against the file's size on opening;
* `.bin` / `.pt` / `.pth` (one file, or shards + `pytorch_model.bin.index.json`): only through
  `torch.load(weights_only=True)` (memory-mapped for zip files), so a pickle that would run code is
  refused instead of executed.
"""
from __future__ import annotations

import dataclasses
import pathlib
import zipfile

import ml_dtypes
import numpy as np

from molmo_jax.weights.errors import WeightsError, read_json

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    file: pathlib.Path


class SafetensorsFile:
    """One safetensors file, opened (header checked) by the safetensors library."""

    def __init__(self, path):
        from safetensors import safe_open  # the PyTorch-side extra; imported only when needed

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such file")
        try:
            self._handle = safe_open(str(self.path), framework="numpy")
            self.metadata = self._handle.metadata() or {}
            self.infos = {}
            for key in self._handle.keys():
                piece = self._handle.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype(), np.dtype("V0"))  # V0: refused by validation
                self.infos[key] = TensorInfo(tuple(int(s) for s in piece.get_shape()), dtype, self.path)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise WeightsError(f"{self.path}: not a readable safetensors file ({e})") from None

    def read(self, key) -> np.ndarray:
        try:
            return self._handle.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{self.path}: cannot read tensor {key!r} ({e})") from None


class TorchFile:
    """A pickled state dict, loaded only through `torch.load(weights_only=True)`."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.metadata = {}
        self.infos = {k: TensorInfo(tuple(t.shape), _numpy_dtype(t), self.path) for k, t in self._load().items()}
        self._state = None

    def _load(self) -> dict:
        import torch  # the PyTorch-side extra; needed only for pickled checkpoints

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True,
                               mmap=zipfile.is_zipfile(self.path))
        except FileNotFoundError:
            raise WeightsError(f"{self.path}: no such file") from None
        except Exception as e:  # weights_only refusals are UnpicklingError; damaged files raise others
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(f"{self.path}: refused: not a plain tensor state dict that torch.load("
                               f"weights_only=True) accepts; it may try to run code ({first})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{self.path}: not a flat {{name: tensor}} state dict")
        return state

    def read(self, key) -> np.ndarray:
        import torch

        if self._state is None:
            self._state = self._load()
        t = self._state[key].detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    def release(self):
        self._state = None


def _numpy_dtype(t) -> np.dtype:
    name = str(t.dtype).removeprefix("torch.")
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype("V0")  # a dtype numpy cannot hold (complex32, quantised): refused by validation


class TensorSource:
    """All tensors of a checkpoint, by key without `prefix` (Molmo checkpoints: `model.`).
    `read(key)` reads one tensor; at most one pickled shard is held in memory at a time."""

    def __init__(self, files: list, only: dict[str, object] | None = None, prefix: str = ""):
        self.files = files
        self.owner: dict[str, object] = {}
        self.raw: dict[str, str] = {}
        for f in files:
            for key in f.infos:
                if only is not None and only.get(key) is not f:
                    continue  # a shard's key that the index does not list
                name = key.removeprefix(prefix) if prefix else key
                if name in self.raw:
                    raise WeightsError(f"{f.path}: key {key!r} is also in {self.owner[name].path} "
                                       f"(as {self.raw[name]!r})")
                self.owner[name], self.raw[name] = f, key
        self._current = None

    def keys(self):
        return self.owner.keys()

    def __contains__(self, name):
        return name in self.owner

    def info(self, name) -> TensorInfo:
        return self.owner[name].infos[self.raw[name]]

    def read(self, name) -> np.ndarray:
        f = self.owner[name]  # KeyError for a missing key
        if self._current is not f and isinstance(self._current, TorchFile):
            self._current.release()
        self._current = f
        return f.read(self.raw[name])

    @property
    def metadata(self) -> dict:
        return self.files[0].metadata if len(self.files) == 1 else {}


def _open_file(path) -> SafetensorsFile | TorchFile:
    return SafetensorsFile(path) if pathlib.Path(path).suffix == ".safetensors" else TorchFile(path)


def _from_index(index: pathlib.Path, prefix: str) -> TensorSource:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index}: no 'weight_map'")
    shards = {}
    for key, name in weight_map.items():
        if name not in shards:
            if not (index.parent / name).is_file():
                raise WeightsError(f"{index}: shard {name} (holding {key!r}) is missing from {index.parent}")
            shards[name] = _open_file(index.parent / name)
        if key not in shards[name].infos:
            raise WeightsError(f"{index}: lists {key!r} in {name}, which does not contain it")
    return TensorSource(list(shards.values()), only={k: shards[n] for k, n in weight_map.items()}, prefix=prefix)


def has_weights(directory) -> bool:
    directory = pathlib.Path(directory)
    return any((directory / name).is_file() for name in INDEXES + SINGLE_FILES)


def open_tensors(path, prefix: str = "") -> TensorSource:
    """A state dict file, or a directory with sharded or single safetensors / pytorch_model.bin."""
    path = pathlib.Path(path)
    if path.is_file():
        return TensorSource([_open_file(path)], prefix=prefix)
    for name in INDEXES:
        if (path / name).is_file():
            return _from_index(path / name, prefix)
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return TensorSource([_open_file(path / name)], prefix=prefix)
    raise WeightsError(f"{path}: no weights found (looked for model.safetensors[.index.json] and "
                       f"pytorch_model.bin[.index.json])")
