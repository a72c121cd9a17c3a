"""RMSNorm and LayerNorm, both computed in float32 whatever the compute dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.layers.core import param


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, then times the weight (docs/architecture.md#blocks)."""

    def __init__(self, dim: int, eps: float, axis_name="norm", *, param_dtype="float32", stack=0):
        self.eps = eps
        self.weight = param(None, (dim,), (axis_name,), param_dtype, init="ones", stack=stack)

    def __call__(self, x):
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(dtype) * self.weight[...].astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, computed in float32 (the ViT's norms)."""

    def __init__(self, dim: int, eps: float, axis_name="vit_embed", *, param_dtype="float32", stack=0):
        self.eps = eps
        self.weight = param(None, (dim,), (axis_name,), param_dtype, init="ones", stack=stack)
        self.bias = param(None, (dim,), (axis_name,), param_dtype, init="zeros", stack=stack)

    def __call__(self, x):
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)
