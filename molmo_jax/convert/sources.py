"""The PyTorch side of the converter: checkpoints read lazily, one tensor at a time, with every shape
and dtype known from the file headers before any tensor data is read.

* safetensors (one file, or shards + `model.safetensors.index.json`): the header (8-byte length +
  JSON) is parsed here, so a truncated or damaged file is named before anything is written, and each
  tensor is read with one `np.fromfile` (bfloat16 included, via ml_dtypes).
* `.bin` / `.pt` / `.pth` (one file, or shards + `pytorch_model.bin.index.json`): only ever through
  `torch.load(weights_only=True)` (memory-mapped for zip files), so a pickle that would run code is
  refused instead of executed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
import zipfile

import ml_dtypes
import numpy as np

from molmo_jax import config as config_lib
from molmo_jax import torch_format
from molmo_jax.checkpoint import CONFIG, CheckpointInfo, config_from_dict, find_checkpoint
from molmo_jax.convert import hf_config
from molmo_jax.torch_format import PREFIX, WeightsError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CONFIG_METADATA_KEY = "molmo_jax_config"  # a state-dict export carries its config in the header


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    file: pathlib.Path


class SafetensorsFile:
    """One safetensors file: header parsed and checked against the file size on opening."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightsError(f"{self.path}: not a safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise WeightsError(f"{self.path}: truncated or not safetensors (header of {n} bytes, "
                                       f"file of {size})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise WeightsError(f"{self.path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{self.path}: damaged safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.infos: dict[str, TensorInfo] = {}
        self.offsets: dict[str, int] = {}
        for key, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: bad header entry for {key!r}: {entry}") from None
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise WeightsError(f"{self.path}: header of {key!r} gives shape {shape} {entry['dtype']} but "
                                   f"{end - begin} bytes")
            if self.data_start + end > size:
                raise WeightsError(f"{self.path}: file is truncated: tensor {key!r} {shape} needs bytes up to "
                                   f"{self.data_start + end}, the file has {size}")
            self.infos[key] = TensorInfo(shape, dtype, self.path)
            self.offsets[key] = self.data_start + begin

    def read(self, key) -> np.ndarray:
        info = self.infos[key]
        return np.fromfile(self.path, dtype=info.dtype, count=math.prod(info.shape),
                           offset=self.offsets[key]).reshape(info.shape)


class TorchFile:
    """A pickled state dict, loaded only through `torch.load(weights_only=True)`."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
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
    """All tensors of a PyTorch checkpoint, by key without `prefix` (Molmo checkpoints: `model.`)."""

    def __init__(self, files: list, only: dict[str, object] | None = None, prefix: str = PREFIX):
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

    def info(self, name) -> TensorInfo:
        return self.owner[name].infos[self.raw[name]]

    def read(self, name) -> np.ndarray:
        f = self.owner[name]  # KeyError for a missing key, as torch_format expects
        if self._current is not f and isinstance(self._current, TorchFile):
            self._current.release()  # keep at most one pickled shard loaded
        self._current = f
        return f.read(self.raw[name])

    @property
    def metadata(self) -> dict:
        return self.files[0].metadata if len(self.files) == 1 and hasattr(self.files[0], "metadata") else {}


def _open_file(path) -> SafetensorsFile | TorchFile:
    return SafetensorsFile(path) if pathlib.Path(path).suffix == ".safetensors" else TorchFile(path)


def _from_index(index: pathlib.Path, prefix: str) -> TensorSource:
    weight_map = torch_format.load_json(index).get("weight_map")
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


def open_tensors(path, prefix: str = PREFIX) -> TensorSource:
    """A state dict file, or a directory with sharded or single safetensors / pytorch_model.bin."""
    path = pathlib.Path(path)
    if path.is_file():
        return TensorSource([_open_file(path)], prefix=prefix)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            return _from_index(path / name, prefix)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return TensorSource([_open_file(path / name)], prefix=prefix)
    raise WeightsError(f"{path}: no weights found (looked for model.safetensors[.index.json] and "
                       f"pytorch_model.bin[.index.json])")


# ------------------------------------------------------------------------------------------------
# Config

def config_from_any_json(d: dict, name: str, source):
    """Original ModelConfig, released HF config (with the molmo_jax extras of our exports), or a
    molmo_jax config."""
    if "llm" in d:
        return config_from_dict(d, source)
    if "hidden_size" in d:
        return hf_config.config_from_released(d, name)
    return torch_format.config_from_json(d, name)


def read_config(info: CheckpointInfo, config=None, tensors: TensorSource | None = None):
    """The model config of a PyTorch checkpoint: `config` (a JSON file or a preset name) if given,
    else its config.json, else (a state-dict file we exported) the config in its header."""
    name = info.path.stem if info.path.is_file() else info.path.name
    if config is not None:
        if str(config) in config_lib.PRESETS:
            return config_lib.get_config(str(config))
        return config_from_any_json(torch_format.load_json(config), name, config)
    if info.config_path is not None:
        return config_from_any_json(torch_format.load_json(info.config_path), name, info.config_path)
    tensors = tensors or open_tensors(info.path)
    if CONFIG_METADATA_KEY in tensors.metadata:
        return config_from_dict(json.loads(tensors.metadata[CONFIG_METADATA_KEY]), info.path)
    raise WeightsError(f"{info.path}: a bare state dict has no config; give one (--config FILE or a preset "
                       f"name: {', '.join(config_lib.PRESETS)}) or put a {CONFIG} next to it")


def open_pytorch(path, config=None):
    """(cfg, tensors) of a PyTorch checkpoint, headers read and nothing else."""
    info = find_checkpoint(path)
    if info.kind != "pytorch":
        raise WeightsError(f"{path}: a {info.kind} checkpoint, not a PyTorch one")
    tensors = open_tensors(info.path)
    return read_config(info, config, tensors), tensors


def read_pytorch(path, config=None, dtype=None):
    """(cfg, {path: array}) of a whole PyTorch checkpoint in memory, validated (for `load_any`)."""
    from molmo_jax.convert import validate
    from molmo_jax.pretrained import param_paths

    cfg, tensors = open_pytorch(path, config)
    cfg.param_dtype = validate.check_torch_tensors(cfg, tensors, dtype)

    def get(key):
        a = tensors.read(key)
        validate.check_finite(a, f"{tensors.info(key).file}: tensor {PREFIX + key!r}")
        return a.astype(cfg.param_dtype, copy=False)

    return cfg, torch_format.torch_to_flat(cfg, get, param_paths(cfg), source=str(path))
