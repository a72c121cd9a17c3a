"""Parameters and dense layers: the pieces every other block is made of.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names
(`embed`, `mlp`, `heads`, ...); `molmo_jax.sharding` maps them to mesh axes with one rules table.
Layers that are scanned are created with a leading `layers` axis (`stack=n`), so one set of arrays
holds all blocks and `jax.lax.scan` runs them (`molmo_jax.layers.scan`).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax import sharding
from molmo_jax.layers.quant import dequantize

Axes = tuple[str | None, ...]

# The original's init for new weights (init_fn "normal", init_std 0.02).
DEFAULT_INIT_STD = 0.02
# How matmul kernels are initialised while a model is being built (set by `init_mode`):
# "normal" = N(0, 0.02) everywhere (the original's init, right on top of pretrained weights);
# "fan_in" = N(0, 1/fan_in), which keeps activations O(1) through many layers when training from
# scratch (the demo); embedding tables (tokens, ViT positions and class) are then N(0, 1), so that a
# token's identity, a patch's position and the image features all enter at the same O(1) scale.
_init_mode = contextvars.ContextVar("init_mode", default="normal")


@contextlib.contextmanager
def init_mode(mode: str):
    if mode not in ("normal", "fan_in"):
        raise ValueError(f"init={mode!r}; choose 'normal' or 'fan_in'")
    token = _init_mode.set(mode)
    try:
        yield
    finally:
        _init_mode.reset(token)


def kernel_std(fan_in: int) -> float:
    return 1.0 / math.sqrt(fan_in) if _init_mode.get() == "fan_in" else DEFAULT_INIT_STD


def residual_out_std(fan_in: int, n_layers: int) -> float:
    """Init std of the matmul closing a residual branch (attention output, MLP down projection).
    "fan_in" mode scales it by 1 / (2 n_layers), so that at init every block (ViT and LLM) is close
    to the identity: with plain fan-in init each random ViT block adds an O(1) term that is nearly the
    same for every token (random attention averages the tokens), and after a few blocks a patch's own
    content and position are a small part of its features. A from-scratch model then takes far
    longer to learn where things are (docs/benchmarks.md, demo). "normal" mode keeps 0.02."""
    std = kernel_std(fan_in)
    return std / (2 * n_layers) if _init_mode.get() == "fan_in" else std


def embedding_std() -> float:
    """Init std of lookup tables: O(1) entries in "fan_in" mode (an embedding row has fan-in 1).
    With 0.02 the token embeddings were 100x smaller than the image features added to them and the
    ViT's position embedding 2% of a patch's features: a from-scratch model then never learnt where
    anything is in the image (docs/benchmarks.md, demo)."""
    return 1.0 if _init_mode.get() == "fan_in" else DEFAULT_INIT_STD


def dtype_of(name) -> jnp.dtype:
    return jnp.dtype(name)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Axes, dtype, init: str = "normal",
          std: float = DEFAULT_INIT_STD, stack: int = 0) -> nnx.Param:
    """A parameter with logical axis names. `stack > 0` prepends a `layers` axis of that size."""
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"parameter shape {shape} and logical axes {axes} differ in rank")
    if stack:
        shape, axes = (stack,) + shape, ("layers",) + axes
    if init == "normal":
        key = rngs.params()
        if isinstance(key, jax.core.Tracer):  # inside jit (sharded init): draw on device
            value = std * jax.random.normal(key, shape, jnp.float32)
        else:  # eager: draw on the host, seeded by the key (avoids one XLA compile per shape)
            seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
            value = jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape, np.float32))
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
    """y = x . kernel (+ bias), contracting the last `len(in_shape)` axes of x.

    Kernels are stored [in..., out...] (Flax convention; PyTorch's [out, in] is transposed on load).
    """

    def __init__(self, in_shape, out_shape, in_axes: Axes, out_axes: Axes, *, use_bias=False,
                 dtype="float32", param_dtype="float32", rngs=None, stack=0, std=None):
        self.in_shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else (in_shape,)
        self.out_shape = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (out_shape,)
        self.dtype = dtype_of(dtype)
        std = kernel_std(math.prod(self.in_shape)) if std is None else std
        self.axes = tuple(in_axes) + tuple(out_axes)
        self.kernel = param(rngs, self.in_shape + self.out_shape, self.axes,
                            param_dtype, std=std, stack=stack)
        self.bias = (param(rngs, self.out_shape, out_axes, param_dtype, init="zeros", stack=stack)
                     if use_bias else None)
        self.lora_a = self.lora_b = None  # low-rank adapters, attached by layers.lora when configured
        self.lora_scale = 0.0
        self.kernel_scale = None  # set by layers.quant: the kernel then holds int8 values

    def __call__(self, x):
        n_in = len(self.in_shape)
        if self.kernel_scale is not None:
            kernel = dequantize(self.kernel[...], self.kernel_scale[...], self.dtype)
        else:
            kernel = self.kernel[...].astype(self.dtype)
        # ZeRO-3: the layer's weights are all-gathered (in the compute dtype) before the matmul
        kernel = sharding.gathered(kernel, self.axes)
        x = x.astype(self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            h = jax.lax.dot_general(x, self.lora_a[...].astype(self.dtype), (contract, ((), ())))
            y = y + self.lora_scale * jax.lax.dot_general(
                h, self.lora_b[...].astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return y


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": jax.nn.gelu, "silu": jax.nn.silu,
               "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False)}
