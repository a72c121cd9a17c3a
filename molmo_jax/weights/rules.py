"""The engine behind every name-and-layout mapping (`weights/mappings/<family>.py`).

A mapping is a list of `Rule`s, each saying which PyTorch tensors (by key, `{i}` = layer index)
become which of our parameters (by path) and how the arrays change on the way (transpose, reshape,
split, fuse), in both directions. From the rules alone this module derives the keys and shapes a
checkpoint must have, checks a checkpoint against them from its headers, converts tensor by tensor,
and exports. Nothing here imports torch: arrays are numpy.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from molmo_jax.weights.errors import WeightsError, listed
from molmo_jax.weights.params import param_paths

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
STAND_IN = np.dtype([])  # zero bytes per element: shapes flow through the transforms for free


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_keys: tuple[str, ...]          # "{i}" is the layer index of a per-layer rule
    paths: tuple[tuple[str, ...], ...]   # our parameter paths (stacked over layers if per-layer)
    to_jax: Callable                     # list of torch-layout arrays -> list of our arrays
    to_torch: Callable                   # the inverse
    n_layers: int | None = None          # per-layer rules: how many layers

    def keys(self, i: int | None) -> list[str]:
        return [k.format(i=i) for k in self.torch_keys] if self.n_layers is not None else list(self.torch_keys)


def rule(keys, paths, fns, n_layers=None) -> Rule:
    """A Rule from "a.b" strings: `keys` one or several torch keys, `paths` one or several paths."""
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    paths = tuple(tuple(p.split(".")) for p in ((paths,) if isinstance(paths, str) else paths))
    return Rule(keys, paths, fns[0], fns[1], n_layers)


# ------------------------------------------------------------------------------------------------
# Transforms: (to_jax, to_torch) pairs over lists of arrays

IDENTITY = (list, list)


def linear(out_shape=None, in_shape=None):
    """torch Linear [out, in] <-> our kernel [*in_shape, *out_shape]."""
    def to_jax(xs):
        w = xs[0].T
        return [w.reshape(tuple(in_shape or w.shape[:1]) + tuple(out_shape or w.shape[1:]))]

    def to_torch(xs):
        w = xs[0]
        n_in = len(in_shape) if in_shape else 1
        return [np.ascontiguousarray(w.reshape(int(np.prod(w.shape[:n_in])), -1).T)]
    return to_jax, to_torch


def reshape(shape):
    return (lambda xs: [xs[0].reshape(shape)]), (lambda xs: [xs[0].reshape(-1)])


def split_rows(sizes, shapes, transpose=True):
    """One fused torch tensor (rows concatenated, e.g. att_proj = [q | k | v]) <-> several of ours."""
    def to_jax(xs):
        parts = np.split(xs[0], np.cumsum(sizes)[:-1], axis=0)
        return [(p.T if transpose and p.ndim == 2 else p).reshape(s) for p, s in zip(parts, shapes)]

    def to_torch(xs):
        flat = [x.reshape(x.shape[0], -1).T if transpose and x.ndim >= 2 else x.reshape(-1) for x in xs]
        return [np.ascontiguousarray(np.concatenate(flat, axis=0))]
    return to_jax, to_torch


def stack_linear(n: int):
    """n torch Linears [out, in] (one per expert) <-> our stacked [n, in, out]."""
    return ((lambda xs: [np.stack([x.T for x in xs])]),
            (lambda xs: [np.ascontiguousarray(xs[0][j].T) for j in range(n)]))


def transposed_last2():
    """torch [n, a, b] <-> ours [n, b, a]."""
    return ((lambda xs: [xs[0].transpose(0, 2, 1)]),
            (lambda xs: [np.ascontiguousarray(xs[0].transpose(0, 2, 1))]))


# ------------------------------------------------------------------------------------------------
# What a checkpoint must hold

def torch_shapes(rules: list[Rule], cfg) -> dict[str, tuple[int, ...]]:
    """{torch key: shape} the rules imply for `cfg`, by running the inverse transforms on arrays of
    a zero-byte dtype (no memory, even for the 72B model)."""
    shapes = param_paths(cfg)
    out = {}
    for r in rules:
        arrays = [np.zeros(shapes[p][1:] if r.n_layers is not None else shapes[p], STAND_IN) for p in r.paths]
        for i in range(r.n_layers) if r.n_layers is not None else (None,):
            for key, a in zip(r.keys(i), r.to_torch(arrays)):
                out[key] = tuple(a.shape)
    return out


def output_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in OUTPUT_DTYPES:
        raise WeightsError(f"dtype {name!r} is not supported (choose one of {', '.join(OUTPUT_DTYPES)})")
    return name


def check_tensors(rules: list[Rule], cfg, tensors, dtype=None, ignore: Callable[[str], bool] | None = None,
                  prefix: str = "", where: str = "") -> str:
    """A checkpoint's key set, shapes and dtypes against the rules, from headers only. Keys for which
    `ignore(key)` is true may be present and are not read. Returns the dtype to convert to: `dtype` if given,
    else the checkpoint's (float32 if mixed)."""
    expected = torch_shapes(rules, cfg)
    present = set(tensors.keys())
    where = f"{where}: " if where else ""
    missing = expected.keys() - present
    if missing:
        raise WeightsError(f"{where}missing keys for this config: "
                           + listed(f"{prefix + k!r} {tuple(expected[k])}" for k in missing))
    unexpected = [k for k in present - expected.keys() if not (ignore and ignore(k))]
    if unexpected:
        raise WeightsError(f"{where}unexpected keys for this config: " + listed(
            f"{prefix + k!r} {tensors.info(k).shape} ({tensors.info(k).file.name})" for k in unexpected))
    dtypes = set()
    for key, shape in expected.items():
        info = tensors.info(key)
        if info.shape != tuple(shape):
            raise WeightsError(f"{info.file}: key {prefix + key!r} has shape {info.shape} but the config "
                               f"expects {tuple(shape)}")
        if info.dtype.name not in FLOAT_DTYPES:
            raise WeightsError(f"{info.file}: key {prefix + key!r} {info.shape} has dtype {info.dtype.name}, "
                               f"not a floating-point type")
        dtypes.add(info.dtype.name)
    if dtype is not None:
        return output_dtype(dtype)
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in OUTPUT_DTYPES else "float32"


_FINITE_BLOCK = 1 << 24  # elements per isfinite pass: bounds the temporary boolean array


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


# ------------------------------------------------------------------------------------------------
# Converting

def convert_rule(r: Rule, i: int | None, read: Callable[[str], np.ndarray]) -> dict:
    """{path: array} of one rule (one layer of a per-layer rule) from `read(torch key)`."""
    keys = r.keys(i)
    arrays = [read(k) for k in keys]
    try:
        return dict(zip(r.paths, r.to_jax(arrays)))
    except ValueError as e:
        shapes = ", ".join(f"{k!r} {tuple(a.shape)}" for k, a in zip(keys, arrays))
        raise WeightsError(f"cannot convert {shapes}: {e}") from None


def to_flat(rules: list[Rule], read: Callable[[str], np.ndarray]) -> dict:
    """All our parameters the rules produce, {path: array}, per-layer rules stacked."""
    flat = {}
    for r in rules:
        if r.n_layers is None:
            flat.update(convert_rule(r, None, read))
            continue
        layers = [convert_rule(r, i, read) for i in range(r.n_layers)]
        flat.update({p: np.stack([layer[p] for layer in layers]) for p in r.paths})
    return flat


def to_torch(rules: list[Rule], flat: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `to_flat`: {prefix + torch key: array}."""
    out = {}
    for r in rules:
        arrays = [np.asarray(flat[p]) for p in r.paths]
        for i in range(r.n_layers) if r.n_layers is not None else (None,):
            layer = [a[i] for a in arrays] if i is not None else arrays
            out.update({prefix + k: a for k, a in zip(r.keys(i), r.to_torch(layer))})
    return out


class StateDict:
    """An in-memory {key: array} dict with the TensorSource interface (keys / info / read)."""

    def __init__(self, state: dict, name: str = "state dict"):
        import pathlib

        self.state, self.file = state, pathlib.Path(name)

    def keys(self):
        return self.state.keys()

    def __contains__(self, key):
        return key in self.state

    def info(self, key):
        from molmo_jax.weights.tensors import TensorInfo

        a = self.state[key]
        return TensorInfo(tuple(np.shape(a)), np.asarray(a).dtype, self.file)

    def read(self, key):
        return np.asarray(self.state[key])


def map_state(rules: list[Rule], cfg, tensors, ignore: Callable[[str], bool] | None = None, what: str = "") -> dict:
    """Check a whole (small) checkpoint against the rules, then convert it: {path: array}."""
    check_tensors(rules, cfg, tensors, ignore=ignore, where=what)
    return to_flat(rules, tensors.read)
