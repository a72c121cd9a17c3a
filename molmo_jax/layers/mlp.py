"""Feed-forward blocks: the SwiGLU MLP and the OLMoE-style mixture of experts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax import sharding
from molmo_jax.layers.core import Dense, kernel_std, param, residual_out_std
from molmo_jax.layers.moe_kernel import moe_gmm


def swiglu(gate, up, down, x):
    """down(silu(gate(x)) * up(x)) for any three projections."""
    return down(jax.nn.silu(gate(x)) * up(x))


class MLP(nnx.Module):
    """SwiGLU: silu(gate(x)) * up(x). The original's fused ff_proj is [up | gate]
    (docs/architecture.md#conventions)."""

    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack):
        d, f = lcfg.d_model, lcfg.mlp_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.w_up = Dense(d, f, ("embed",), ("mlp",), **kw)
        self.w_gate = Dense(d, f, ("embed",), ("mlp",), **kw)
        self.w_down = Dense(f, d, ("mlp",), ("embed",), std=residual_out_std(f, lcfg.n_layers), **kw)

    def __call__(self, x):
        return swiglu(self.w_gate, self.w_up, self.w_down, x)


MOE_IMPLEMENTATIONS = ("auto", "gmm", "ragged", "dense")


def moe_kernel(impl: str) -> str:
    """What `moe_impl` runs here: "auto" is the grouped-matmul kernel on TPU, XLA's ragged dot
    elsewhere (the kernel is TPU-only; on CPU it runs in interpret mode, for tests)."""
    if impl != "auto":
        return impl
    return "gmm" if sharding.platform() == "tpu" else "ragged"


class MoE(nnx.Module):
    """OLMoE mixture of experts: softmax over all experts, top-k, no renormalisation, dropless."""

    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack):
        d, f, e = lcfg.d_model, lcfg.mlp_dim, lcfg.moe_num_experts
        self.top_k, self.impl = lcfg.moe_top_k, lcfg.moe_impl
        if self.impl not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"llm.moe_impl={self.impl!r}; choose one of {', '.join(MOE_IMPLEMENTATIONS)}")
        self.dtype = jnp.dtype(dtype)
        self.router = Dense(d, e, ("embed",), ("experts",), dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs, stack=stack)
        kw = dict(stack=stack)
        self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), param_dtype, std=kernel_std(d), **kw)
        self.w_up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), param_dtype, std=kernel_std(d), **kw)
        self.w_down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), param_dtype,
                            std=residual_out_std(f, lcfg.n_layers), **kw)

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).astype(self.dtype)
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)
        weights, experts = jax.lax.top_k(probs, self.top_k)                   # [N, k]
        wg, wu, wd = (w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        impl = moe_kernel(self.impl)
        if impl == "gmm":
            out = moe_gmm(x, experts, weights, wg, wu, wd, interpret=sharding.platform() == "cpu")
        elif impl == "dense":  # every expert on every token: exact and simple, for small models
            h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, wg)) * jnp.einsum("nd,edf->nef", x, wu)
            y = jnp.einsum("nef,efd->ned", h, wd)
            combine = jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
            out = jnp.einsum("ned,ne->nd", y, combine.astype(y.dtype))
        else:  # sort the (token, expert) pairs by expert and run grouped matmuls: no token dropped
            n_exp = wg.shape[0]
            flat = experts.reshape(-1)
            order = jnp.argsort(flat, stable=True)
            xs = x[order // self.top_k]
            sizes = jnp.bincount(flat, length=n_exp).astype(jnp.int32)
            h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, sizes)) * jax.lax.ragged_dot(xs, wu, sizes)
            ys = jax.lax.ragged_dot(h, wd, sizes)
            y = jnp.zeros_like(ys).at[order].set(ys).reshape(x.shape[0], self.top_k, -1)
            out = jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype))
        return out.reshape(shape)
