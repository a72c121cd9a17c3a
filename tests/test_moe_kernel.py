"""The grouped-matmul mixture of experts (layers.moe_kernel: Pallas megablox gmm/tgmm, here in
interpret mode on the CPU) against XLA's ragged dot: forward and gradients, alone and per shard
under meshes with tensor and expert parallelism."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from molmo_jax import sharding
from molmo_jax.config import llm_config
from molmo_jax.layers.mlp import MoE, moe_kernel
from molmo_jax.layers.moe_kernel import moe_gmm

N, D, F, E, K = 48, 32, 24, 8, 2


def inputs(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, D)), dtype)
    # Skewed routing: expert 3 gets nothing, expert 0 many tokens (groups straddle row tiles).
    logits = rng.standard_normal((N, E)) + np.array([2.0, 0, 0, -9, 0, 0.5, 0, 0])
    weights, experts = jax.lax.top_k(jax.nn.softmax(jnp.asarray(logits)), K)
    ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dtype) for s in ((E, D, F), (E, D, F), (E, F, D))]
    return x, experts.astype(jnp.int32), weights.astype(dtype), ws


def ragged(x, experts, weights, wg, wu, wd):
    order = jnp.argsort(experts.reshape(-1), stable=True)
    sizes = jnp.bincount(experts.reshape(-1), length=wg.shape[0]).astype(jnp.int32)
    xs = x[order // K]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, wg, sizes)) * jax.lax.ragged_dot(xs, wu, sizes)
    ys = jnp.zeros((N * K, D), x.dtype).at[order].set(jax.lax.ragged_dot(h, wd, sizes))
    return jnp.einsum("nkd,nk->nd", ys.reshape(N, K, D), weights)


def loss_and_grads(fn, x, experts, weights, ws):
    def loss(x, weights, ws):
        return jnp.sum(jnp.sin(fn(x, experts, weights, *ws).astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weights, ws)


def gmm(x, experts, weights, wg, wu, wd):
    return moe_gmm(x, experts, weights, wg, wu, wd, interpret=True)


MESHES = {"none": None, "fsdp=2 tensor=2 data=2": dict(data=2, fsdp=2, tensor=2),
          "expert=4 tensor=2": dict(expert=4, tensor=2), "fsdp=2 expert=2 tensor=2": dict(fsdp=2, expert=2, tensor=2)}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_float32_forward_and_gradients_match_ragged_dot(mesh):
    x, experts, weights, ws = inputs(jnp.float32)
    want = loss_and_grads(ragged, x, experts, weights, ws)
    spec = MESHES[mesh]
    with sharding.use_mesh(sharding.make_mesh(spec)) if spec else contextlib.nullcontext():
        got = loss_and_grads(gmm, x, experts, weights, ws)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # f32 sums of at most 32 products per dot, reassociated by the tiles and the shard sums.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[1][2][0][3]).max()) == 0.0  # the expert no token chose gets no gradient


def test_bfloat16_matches_ragged_dot():
    x, experts, weights, ws = inputs(jnp.bfloat16)
    want = ragged(x, experts, weights, *ws).astype(jnp.float32)
    with sharding.use_mesh(sharding.make_mesh(dict(expert=2, tensor=2, fsdp=2))):
        got = jax.jit(gmm)(x, experts, weights, *ws).astype(jnp.float32)
    # bf16 keeps 8 bits of mantissa: each output is rounded at the gate/up/down products and at the
    # tensor-shard sum, so allow a few bf16 ulps of the output's scale (~1).
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-2, rtol=2e-2)


def test_moe_block_auto_is_ragged_on_cpu_and_gmm_block_matches():
    assert moe_kernel("auto") == "ragged" and moe_kernel("dense") == "dense"
    cfg = llm_config(moe_num_experts=E, moe_top_k=K, mlp_dim=F, d_model=D, n_layers=2)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, D)), jnp.float32)
    outs = {}
    for impl in ("ragged", "gmm"):
        cfg.moe_impl = impl
        outs[impl] = MoE(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0), stack=0)(x)
    np.testing.assert_allclose(np.asarray(outs["gmm"]), np.asarray(outs["ragged"]), rtol=1e-5, atol=1e-5)
    cfg.moe_impl = "megablocks"
    with pytest.raises(ValueError, match="moe_impl='megablocks'; choose one of auto, gmm, ragged, dense"):
        MoE(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0), stack=0)
