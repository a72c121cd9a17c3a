"""This project's checkpoint format: a model directory holds `config.json` (the model config) and
`params/` (an orbax PyTree checkpoint of the parameters), and optionally `tokenizer/`. A training
run's steps (`WORKDIR/checkpoints/<step>/params`) hold the same `params`.

Reading goes straight into the requested shardings (every device reads only its part); nothing
here knows any other format.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from molmo_jax.weights.configs import config_to_json
from molmo_jax.weights.errors import WeightsError
from molmo_jax.weights.params import check_param_shapes, flatten_params, nested, uniform_dtype
from molmo_jax.weights.rules import FLOAT_DTYPES
from molmo_jax.weights.locate import CONFIG, PARAMS, TOKENIZER
from molmo_jax.weights.writing import atomic_output, copy_tokenizer


def save_model(directory, cfg, params, tokenizer_dir=None, overwrite=False) -> pathlib.Path:
    """Write a model directory. `params`: an nnx Module or State, a nested dict or a flat {path: array}
    dict, matching `cfg`. The saved config's `param_dtype` is the parameters' dtype when they share one."""
    flat = flatten_params(params)
    check_param_shapes(cfg, {p: np.shape(v) for p, v in flat.items()}, "save_model")
    cfg = ConfigDict(cfg.to_dict())
    dtype = uniform_dtype(v.dtype for v in flat.values())
    if dtype:
        cfg.param_dtype = dtype
    with atomic_output(directory, overwrite) as tmp:
        tmp.mkdir()
        (tmp / CONFIG).write_text(config_to_json(cfg))
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(tmp / PARAMS, args=ocp.args.PyTreeSave(nested(flat)))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / TOKENIZER)
    return pathlib.Path(directory)


def stored_params(params_dir) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of an orbax params checkpoint, from its metadata (no array is read)."""
    try:
        # Absolute: orbax returns no item metadata for a relative path to a training run's params
        # (runs/x/checkpoints/N/params), and the restore below would have nothing to go on.
        meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(
            pathlib.Path(params_dir).absolute()).item_metadata
    except Exception as e:  # orbax raises assorted errors for a damaged directory
        raise WeightsError(f"{params_dir}: not a readable orbax checkpoint ({e})") from None
    if meta is None:
        raise WeightsError(f"{params_dir}: orbax checkpoint without parameter metadata")
    return {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in flatten_params(dict(meta.tree)).items()}


def check_stored_params(cfg, stored: dict, source) -> None:
    """An orbax params checkpoint against `cfg`: every parameter present, shaped as the config says,
    and of a floating-point dtype."""
    check_param_shapes(cfg, {p: s for p, (s, _) in stored.items()}, source)
    for path, (shape, dtype) in stored.items():
        if np.dtype(dtype).name not in FLOAT_DTYPES:
            raise WeightsError(f"{source}: parameter {'.'.join(path)} {shape} has dtype {np.dtype(dtype).name}, "
                               f"not a floating-point type")


def shardings_by_path(shardings, paths) -> dict:
    """{path: sharding or None} from None, one sharding for all, or a pytree / flat dict of them."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return {p: shardings for p in paths}
    flat = flatten_params(shardings)
    missing = sorted(".".join(p) for p in paths if p not in flat)
    if missing:
        raise WeightsError(f"shardings: no sharding for {', '.join(missing[:5])}")
    return flat


def restore_params(params_dir, cfg, shardings=None, dtype=None, select=None) -> dict:
    """{path: jax.Array} of a params checkpoint, checked against `cfg` (the parameters `select`
    picks, if given), each array read straight into its sharding (default: the first device) and
    cast to `dtype` while reading."""
    stored = stored_params(params_dir)
    check_param_shapes(cfg, {p: shape for p, (shape, _) in stored.items()}, params_dir, select)
    by_path = shardings_by_path(shardings, stored)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args, abstract = {}, {}
    for path, (shape, stored_dtype) in stored.items():
        sharding = by_path[path] or default
        want = np.dtype(dtype) if dtype is not None else stored_dtype
        restore_args[path] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=want, global_shape=shape)
        abstract[path] = jax.ShapeDtypeStruct(shape, want, sharding=sharding)
    try:
        restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            pathlib.Path(params_dir).absolute(),
            args=ocp.args.PyTreeRestore(item=nested(abstract), restore_args=nested(restore_args)))
    except Exception as e:
        raise WeightsError(f"{params_dir}: cannot restore the parameters ({e})") from None
    return flatten_params(restored)
