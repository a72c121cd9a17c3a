"""Checks run before (headers) and while (values) converting. Every error names the file, the key
and the shapes or dtypes involved."""
from __future__ import annotations

import numpy as np

from molmo_jax import torch_format
from molmo_jax.pretrained import param_paths
from molmo_jax.torch_format import PREFIX, WeightsError

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
_FINITE_BLOCK = 1 << 24  # elements per isfinite pass: bounds the temporary boolean array


def _listed(items, n=5) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def output_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in OUTPUT_DTYPES:
        raise WeightsError(f"dtype {name!r} is not supported (choose one of {', '.join(OUTPUT_DTYPES)})")
    return name


def torch_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{torch key without `model.`: shape} that `cfg` implies. The conversion rules run on arrays of a
    zero-byte dtype, so this costs no memory even for the 72B model."""
    empty = np.dtype([])
    flat = {path: np.zeros(shape, empty) for path, shape in param_paths(cfg).items()}
    return {key.removeprefix(PREFIX): a.shape for key, a in torch_format.flat_to_torch(cfg, flat).items()}


def check_torch_tensors(cfg, tensors, dtype=None) -> str:
    """Key set, shapes and dtypes of a PyTorch checkpoint against `cfg`, from headers only. Returns
    the parameter dtype to convert to: `dtype` if given, else the checkpoint's (float32 if mixed)."""
    expected = torch_shapes(cfg)
    present = set(tensors.keys())
    missing = expected.keys() - present
    if missing:
        raise WeightsError(f"missing keys for this config: {_listed(PREFIX + k for k in missing)}")
    unexpected = present - expected.keys()
    if unexpected:
        raise WeightsError("unexpected keys for this config: " + _listed(
            f"{PREFIX + k} ({tensors.info(k).file.name})" for k in unexpected))
    dtypes = set()
    for key, shape in expected.items():
        info = tensors.info(key)
        if info.shape != tuple(shape):
            raise WeightsError(f"{info.file}: key {PREFIX + key!r} has shape {info.shape} but the config "
                               f"expects {tuple(shape)}")
        if info.dtype.name not in FLOAT_DTYPES:
            raise WeightsError(f"{info.file}: key {PREFIX + key!r} {info.shape} has dtype {info.dtype.name}, "
                               f"not a floating-point type")
        dtypes.add(info.dtype.name)
    if dtype is not None:
        return output_dtype(dtype)
    if len(dtypes) == 1 and next(iter(dtypes)) in OUTPUT_DTYPES:
        return next(iter(dtypes))
    return "float32"


def check_finite(a: np.ndarray, what: str) -> None:
    """Raise if `a` holds NaN or Inf, naming `what`, the shape and the first bad index."""
    flat = a.reshape(-1)
    for start in range(0, flat.size, _FINITE_BLOCK):
        ok = np.isfinite(flat[start:start + _FINITE_BLOCK])
        if not ok.all():
            bad = int(np.sum(~np.isfinite(flat))) if flat.size <= _FINITE_BLOCK else None
            first = np.unravel_index(start + int(np.argmin(ok)), a.shape)
            count = f"{bad} NaN/Inf values" if bad is not None else "NaN/Inf values"
            raise WeightsError(f"{what} {tuple(a.shape)} has {count} (first at index {tuple(map(int, first))})")


def check_stored_params(cfg, stored: dict, source) -> None:
    """An orbax params checkpoint against `cfg`: every parameter present, shaped as the config says,
    and of a floating-point dtype."""
    from molmo_jax.checkpoint import check_param_shapes

    check_param_shapes(cfg, {p: s for p, (s, _) in stored.items()}, source)
    for path, (shape, dtype) in stored.items():
        if np.dtype(dtype).name not in FLOAT_DTYPES:
            raise WeightsError(f"{source}: parameter {'.'.join(path)} {shape} has dtype {np.dtype(dtype).name}, "
                               f"not a floating-point type")
