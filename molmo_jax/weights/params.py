"""Parameters as flat {path tuple: array} dicts, and models built from them.

A path is the tuple of attribute names of an nnx parameter, e.g. ('llm', 'blocks', 'attn', 'wq',
'kernel'); stacked layers have a leading `layers` axis. Every weight format converts to and from
this flat form.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax.models import abstract_model
from molmo_jax.weights.errors import WeightsError, listed


def param_paths(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{parameter path: shape} of the model `cfg` describes (computed abstractly)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return {tuple(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def flatten_params(params) -> dict[tuple[str, ...], object]:
    """{path: array} from an nnx Module / State, a nested dict or a flat {path tuple: array} dict."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    if params and all(isinstance(k, tuple) for k in params):
        return {tuple(str(p) for p in k): v for k, v in params.items()}
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (str(k),), v)
        else:
            flat[prefix] = node
    walk((), params)
    return flat


def nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def check_param_shapes(cfg, shapes: dict, source, select=None) -> None:
    """Every parameter of the model `cfg` describes (those `select(path)` picks, if given) is there
    with its shape, and nothing else."""
    expected = {p: s for p, s in param_paths(cfg).items() if select is None or select(p)}
    missing = [".".join(p) for p in expected.keys() - shapes.keys()]
    unexpected = [".".join(p) for p in shapes.keys() - expected.keys()]
    if missing:
        raise WeightsError(f"{source}: missing parameters {listed(missing)}")
    if unexpected:
        raise WeightsError(f"{source}: parameters the config does not have: {listed(unexpected)}")
    for path, shape in expected.items():
        if tuple(shapes[path]) != tuple(shape):
            raise WeightsError(f"{source}: parameter {'.'.join(path)} has shape {tuple(shapes[path])} but the "
                               f"config expects {tuple(shape)}")


def uniform_dtype(dtypes) -> str | None:
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 else None


def model_from_flat(cfg, flat: dict, dtype=None):
    """The model whose parameters are `flat` ({path: array}), without a random init first. Arrays
    already on devices keep their placement; `dtype` casts every parameter."""
    graphdef, state = nnx.split(abstract_model(cfg))
    leaves = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        if key not in flat:
            raise WeightsError(f"no value for parameter {'.'.join(key)}")
        value = flat[key]
        if dtype is not None:
            value = jnp.asarray(value, dtype=jnp.dtype(dtype))
        elif not isinstance(value, jax.Array):
            value = jnp.asarray(value)
        leaves.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def model_to_flat(model) -> dict[tuple[str, ...], np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {tuple(str(k) for k in path): np.asarray(jax.device_get(v[...]))
            for path, v in nnx.to_flat_state(state)}
