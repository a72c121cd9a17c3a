"""Checkpoints in PyTorch form (Molmo: the original repo's or the released Hugging Face layout;
Molmo2: transformers' layout; or a state dict file): their config, and their tensors under our
parameter names, through the mapping of the config's family (`mappings.for_config`).

The config comes from `--config` (a JSON file or a preset name) if given, else the checkpoint's
`config.json` (original, released, or this project's own), else, for a state dict file this project
exported, the config stored in its header.
"""
from __future__ import annotations

import json

from molmo_jax import config as config_lib
from molmo_jax.weights.configs import config_from_dict
from molmo_jax.weights.errors import WeightsError, read_json
from molmo_jax.weights.locate import CONFIG, CheckpointInfo, find_checkpoint
from molmo_jax.weights.mappings import for_config
from molmo_jax.weights.mappings import molmo as molmo_mapping
from molmo_jax.weights.mappings import molmo2 as molmo2_mapping
from molmo_jax.weights.params import param_paths
from molmo_jax.weights.rules import check_finite, check_tensors, to_flat
from molmo_jax.weights.tensors import TensorSource, open_tensors

CONFIG_METADATA_KEY = "molmo_jax_config"  # a state-dict export carries its config in the header


def config_from_json(d: dict, name: str, source):
    """A model config from any config.json a Molmo checkpoint may carry, recognised by its keys."""
    if "llm" in d:
        return config_from_dict(d, source)
    if d.get("model_type") == "molmo2":
        return molmo2_mapping.config_from_hf(d, name)
    if "hidden_size" in d:
        return molmo_mapping.config_from_released(d, name)
    if "d_model" in d:
        return molmo_mapping.config_from_original(d, name)
    raise WeightsError(f"{source}: neither an original ModelConfig (no 'd_model'), a released HF Molmo "
                       "config (no 'hidden_size') nor a molmo_jax config (no 'llm')")


def read_config(info: CheckpointInfo, config=None, tensors: TensorSource | None = None):
    """The model config of a PyTorch checkpoint (see the module docstring for where it comes from)."""
    name = info.path.stem if info.path.is_file() else info.path.name
    if config is not None:
        if str(config) in config_lib.PRESETS:
            return config_lib.get_config(str(config))
        return config_from_json(read_json(config), name, config)
    if info.config_path is not None:
        return config_from_json(read_json(info.config_path), name, info.config_path)
    tensors = tensors or open_tensors(info.path, prefix=molmo_mapping.PREFIX)
    if CONFIG_METADATA_KEY in tensors.metadata:
        return config_from_dict(json.loads(tensors.metadata[CONFIG_METADATA_KEY]), info.path)
    raise WeightsError(f"{info.path}: a bare state dict has no config; give one (--config FILE or a preset "
                       f"name: {', '.join(config_lib.PRESETS)}) or put a {CONFIG} next to it")


def open_pytorch(path, config=None):
    """(cfg, tensors) of a PyTorch checkpoint (a path, or what `find_checkpoint` made of it), headers
    read and nothing else."""
    info = path if isinstance(path, CheckpointInfo) else find_checkpoint(path)
    if info.kind != "pytorch":
        raise WeightsError(f"{info.path}: a {info.kind} checkpoint, not a PyTorch one")
    if config is not None or info.config_path is not None:
        cfg = read_config(info, config)
        return cfg, open_tensors(info.path, prefix=for_config(cfg).PREFIX)
    tensors = open_tensors(info.path, prefix=molmo_mapping.PREFIX)  # the config may be in its header
    cfg = read_config(info, config, tensors)
    prefix = for_config(cfg).PREFIX
    return cfg, tensors if prefix == molmo_mapping.PREFIX else open_tensors(info.path, prefix=prefix)


def checked_reader(tensors, prefix: str = "", dtype=None):
    """`read(key)` for the converters: one tensor, checked for NaN/Inf (named by file and key), cast."""
    def read(key):
        a = tensors.read(key)
        check_finite(a, f"{tensors.info(key).file}: tensor {prefix + key!r}")
        return a if dtype is None else a.astype(dtype, copy=False)
    return read


def read_pytorch(path, config=None, dtype=None):
    """(cfg, {path: array}) of a whole PyTorch checkpoint in memory, validated from the headers first."""
    cfg, tensors = open_pytorch(path, config)
    return cfg, convert_tensors(cfg, tensors, dtype, getattr(path, "path", path))


def convert_tensors(cfg, tensors, dtype=None, where="") -> dict:
    """{path: array} of an opened PyTorch checkpoint, checked against `cfg` from its headers first;
    sets `cfg.param_dtype` to what the arrays are converted to."""
    mapping = for_config(cfg)
    rules = mapping.rules(cfg, tensors)
    cfg.param_dtype = check_tensors(rules, cfg, tensors, dtype, prefix=mapping.PREFIX, where=str(where))
    flat = to_flat(rules, checked_reader(tensors, mapping.PREFIX, cfg.param_dtype))
    if flat.keys() != param_paths(cfg).keys():  # the rules of a config cover exactly its parameters
        raise WeightsError(f"{where}: internal: the mapping does not cover the config's parameters")
    return flat
