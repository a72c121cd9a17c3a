"""Weight-only quantization of the LLM's Dense kernels: int8 with one scale per output channel, or
int4 with one scale per group of `group` inputs (along the last input axis; a group wider than that
axis covers all of it) and output channel.

The quantized values (int8 storage for both; int4 values lie in [-8, 7]) replace the kernel under its
own name and logical axes, and a `kernel_scale` parameter holds the scales; a Dense dequantizes when it
runs. The scales come from qwix (`qwix.quantize`, absmax calibration), the library this project uses
for quantization. A model config's `quant` section ({"weights": "int8" | "int4", "group": N}) makes
`models.create_model` build the quantized structure, so a quantized checkpoint saves and loads like
any other, without quantizing again.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

KINDS = ("float", "int8", "int4")
TARGETS = r"^llm\."   # the decoder's projections and output head: what a decode step reads
HEAD = r"^llm\.ff_out$"
DEFAULT_GROUP = 128


def quant_config(weights: str = "float", group: int = DEFAULT_GROUP, head: bool = False) -> ml_collections.ConfigDict:
    """`head`: quantize the output head too. Off by default: the head's logits are what top-1
    agreement is decided on (int4 in groups of 16 on the golden olmo-style model: 72.7% with the head
    quantized, 84.4% without), and its dequantized float32 copy (vocab x d_model, 64 MB at bench-s) is
    the one temporary of a decode step above glibc's 32 MB mmap limit, page-faulted in again every
    token on a CPU (docs/benchmarks.md, bench_matvec)."""
    return ml_collections.ConfigDict(dict(weights=weights, group=int(group), head=bool(head)))


def parse(text: str) -> ml_collections.ConfigDict:
    """"int8", "int4", "int4:64" (groups of 64 inputs) or "float", with "+head" to quantize the
    output head as well (e.g. "int8+head") -> a quant config."""
    text = str(text)
    body, plus, extra = text.partition("+")
    if plus and extra != "head":
        raise ValueError(f"weights {text!r}: the only suffix is +head (quantize the output head too)")
    kind, _, group = body.partition(":")
    if kind not in KINDS:
        raise ValueError(f"weights {text!r}: choose one of {', '.join(KINDS)} (int4 takes :GROUP, e.g. int4:64; "
                         "+head quantizes the output head too)")
    if group and not group.isdigit():
        raise ValueError(f"weights {text!r}: the int4 group size must be a positive integer")
    return quant_config(kind, int(group) if group else DEFAULT_GROUP, head=bool(plus))


def enabled(cfg) -> bool:
    q = cfg.get("quant")
    return q is not None and q.get("weights", "float") != "float"


def _targets(model, head: bool):
    from molmo_jax.layers.core import Dense

    pattern, head_pattern = re.compile(TARGETS), re.compile(HEAD)
    for path, node in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(node, Dense) and pattern.search(name) and (head or not head_pattern.search(name)):
            yield name, node


def check(qcfg, model) -> list:
    if qcfg.weights not in KINDS:
        raise ValueError(f"weights={qcfg.weights!r}; choose one of {', '.join(KINDS)}")
    # configs saved before `head` existed quantized the head
    found = list(_targets(model, bool(qcfg.get("head", True))))
    if qcfg.weights == "int4":
        for name, dense in found:
            width = dense.in_shape[-1]
            if qcfg.group < 1 or width % _group(qcfg.group, width):
                raise ValueError(f"int4 group size {qcfg.group} does not divide {name}.kernel's input width "
                                 f"{width}; choose a divisor (e.g. {np.gcd(width, DEFAULT_GROUP)})")
    return found


def _group(group: int, width: int) -> int:
    """A group wider than the axis it tiles is the whole axis (e.g. 128 on a 64-wide head_dim)."""
    return min(group, width)


def quantize_array(w, kind: str, n_stack: int, n_in: int, group: int):
    """(int8 values, float32 scales) of a kernel [*stack, *in, *out] by qwix: per output channel
    (int8) or per `group` inputs along the last input axis (int4). Scales keep the kernel's rank: the
    input axes have size 1, or (int4) the last one has in / group entries."""
    import qwix

    w = jnp.asarray(w, jnp.float32)
    last_in = n_stack + n_in - 1
    out_axes = tuple(range(n_stack + n_in, w.ndim))
    channelwise = tuple(range(n_stack)) + out_axes
    if kind == "int8":
        q = qwix.quantize(w, jnp.int8, channelwise_axes=channelwise)
    else:
        q = qwix.quantize(w, jnp.int4, channelwise_axes=channelwise, tiled_axes={last_in: _group(group, w.shape[last_in])})
    return np.asarray(q.qvalue).astype(np.int8), np.asarray(q.scale, np.float32)


def dequantize(q, scale, dtype):
    """The kernel back from int8 values and scales (broadcast, or repeated along a tiled axis)."""
    for axis, (n, m) in enumerate(zip(q.shape, scale.shape)):
        if m not in (1, n):  # tiled: each scale covers n // m consecutive entries
            scale = jnp.repeat(scale, n // m, axis=axis)
    return (q.astype(jnp.float32) * scale).astype(dtype)


def quantize_params(flat: dict, model, qcfg) -> dict:
    """Flat float parameters {path: array} -> the same with the kernels `model` holds quantized
    (int8 values and `kernel_scale`), e.g. a float base loaded under a quantized model."""
    out = dict(flat)
    for name, dense in check(qcfg, model):
        path = tuple(name.split(".")) + ("kernel",)
        n_in, n_out = len(dense.in_shape), len(dense.out_shape)
        w = np.asarray(flat[path], np.float32)
        out[path], out[path[:-1] + ("kernel_scale",)] = quantize_array(w, qcfg.weights, w.ndim - n_in - n_out, n_in,
                                                                       qcfg.group)
    return out


def quantize_model(model, qcfg, values: bool = True):
    """Replace the targeted kernels of `model` (in place) by int8 values + scales and return it.
    With `values` False only the structure changes (the values are zeros): what an abstract model
    for loading a quantized checkpoint needs."""
    for _, dense in check(qcfg, model):
        kernel = dense.kernel
        axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
        n_in, n_out = len(dense.in_shape), len(dense.out_shape)
        n_stack = kernel.ndim - n_in - n_out
        if values:
            q, scale = quantize_array(kernel[...], qcfg.weights, n_stack, n_in, qcfg.group)
        else:
            q = np.zeros(kernel.shape, np.int8)
            scale_shape = [1 if n_stack <= i < n_stack + n_in else s for i, s in enumerate(kernel.shape)]
            if qcfg.weights == "int4":
                width = kernel.shape[n_stack + n_in - 1]
                scale_shape[n_stack + n_in - 1] = width // _group(qcfg.group, width)
            scale = np.zeros(scale_shape, np.float32)
        scale_axes = tuple(a if scale.shape[i] == kernel.shape[i] else None for i, a in enumerate(axes))
        dense.kernel = nnx.Param(jnp.asarray(q), out_sharding=axes, eager_sharding=False)
        dense.kernel_scale = nnx.data(nnx.Param(jnp.asarray(scale), out_sharding=scale_axes, eager_sharding=False))
    return model
