"""Loading PyTorch-format Molmo directories into molmo_jax models.

A directory is either the original training repo's form (`config.json` = its ModelConfig,
`model.safetensors` with `model.<key>` names, as `tests/fixtures/golden/models/*`) or a released
Hugging Face one (`config.json` of MolmoForCausalLM, one `model.safetensors` or shards listed in
`model.safetensors.index.json`). Tensors are read lazily, one at a time.
"""
from __future__ import annotations

import contextlib
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax import torch_format
from molmo_jax.models import abstract_model
from molmo_jax.torch_format import WeightsError

INDEX = "model.safetensors.index.json"


def param_paths(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape} of the model `cfg` describes (computed abstractly)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return {tuple(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def model_from_flat(cfg, flat: dict, dtype=None):
    """Molmo whose parameters are `flat` ({path: array}), without a random init first."""
    graphdef, state = nnx.split(abstract_model(cfg))
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        if key not in flat:
            raise WeightsError(f"no value for parameter {'.'.join(key)}")
        leaves.append((path, var.replace(jnp.asarray(flat[key], dtype=dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def model_to_flat(model) -> dict[tuple[str, ...], np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {tuple(str(k) for k in path): np.asarray(jax.device_get(v[...]))
            for path, v in nnx.to_flat_state(state)}


class SafetensorsReader(contextlib.AbstractContextManager):
    """Lazy reader over one safetensors file or an index of shards; `reader[key]` -> numpy array."""

    def __init__(self, directory):
        from safetensors import safe_open  # the PyTorch-side extra; imported only when needed

        directory = pathlib.Path(directory)
        self.files: dict[str, pathlib.Path] = {}
        index = directory / INDEX
        if index.exists():
            weight_map = torch_format.load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index}: no 'weight_map'")
            for key, name in weight_map.items():
                path = directory / name
                if not path.exists():
                    raise WeightsError(f"{index}: shard {name} (holding {key!r}) is missing from {directory}")
                self.files[key] = path
        elif (directory / "model.safetensors").exists():
            path = directory / "model.safetensors"
            self.files = {k: path for k in self._open(safe_open, path).keys()}
        else:
            raise WeightsError(f"{directory}: no model.safetensors and no {INDEX}")
        self._safe_open = safe_open
        self._handles = {}

    @staticmethod
    def _open(safe_open, path):
        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None

    def keys(self):
        return self.files.keys()

    def __getitem__(self, key):
        path = self.files[key]  # KeyError for a missing key, as torch_to_flat expects
        if path not in self._handles:
            self._handles[path] = self._open(self._safe_open, path)
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{path}: cannot read tensor {key!r} ({e})") from None

    def __exit__(self, *exc):
        self._handles.clear()
        return False


def load_config(directory, name=None):
    directory = pathlib.Path(directory)
    d = torch_format.load_json(directory / "config.json")
    return torch_format.config_from_json(d, name or directory.name)


def load_flat(cfg, directory) -> dict:
    """Read and convert every tensor, checking names and shapes against `cfg`."""
    directory = pathlib.Path(directory)
    expected = param_paths(cfg)
    with SafetensorsReader(directory) as reader:
        wanted = set(torch_format.expected_torch_keys(cfg))
        present = {k[len(torch_format.PREFIX):] if k.startswith(torch_format.PREFIX) else k
                   for k in reader.keys()}
        unexpected = sorted(present - wanted)
        if unexpected:
            raise WeightsError(f"{directory}: unexpected keys for this config: "
                               f"{', '.join(torch_format.PREFIX + k for k in unexpected[:5])}"
                               + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))

        def get(key):
            for candidate in (torch_format.PREFIX + key, key):
                if candidate in reader.files:
                    return reader[candidate]
            raise KeyError(key)

        return torch_format.torch_to_flat(cfg, get, expected, source=str(directory))


def load_pytorch_dir(directory, **overrides):
    """(config, model) from a PyTorch-format directory. `overrides` update the config's top level
    (e.g. dtype="bfloat16", param_dtype="bfloat16")."""
    if not os.path.isdir(directory):
        raise WeightsError(f"{directory}: not a directory")
    cfg = load_config(directory)
    cfg.update(overrides)
    flat = load_flat(cfg, directory)
    return cfg, model_from_flat(cfg, flat)
