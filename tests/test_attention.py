"""The attention core (molmo_jax.layers.attention.attend) and its softmax with a hand-written derivative."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from molmo_jax.layers import attention as layers


def test_softmax_matches_jax_and_its_derivatives_are_right():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7)) * 4
    x = x.at[0, 0].set(jnp.finfo(jnp.float32).min).at[1, 1, :3].set(jnp.finfo(jnp.float32).min)  # masked
    np.testing.assert_allclose(layers.softmax(x), jax.nn.softmax(x, axis=-1), rtol=1e-6, atol=1e-7)
    y = jax.random.normal(jax.random.key(1), (2, 4, 6))
    # against finite differences, which in float32 agree to ~1e-3 at best
    check_grads(layers.softmax, (y,), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    w = jax.random.normal(jax.random.key(2), y.shape)
    ours = jax.grad(lambda y: (layers.softmax(y) * w).sum())(y)
    theirs = jax.grad(lambda y: (jax.nn.softmax(y, axis=-1) * w).sum())(y)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # f32 rounding only


def test_grouped_query_attention_equals_repeated_kv_heads():
    """Query head h reads kv head h // (Hq / Hkv) (the original's repeat_interleave); causal mask."""
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (2, 6, 4, 8))
    k, v = (jax.random.normal(kk, (2, 6, 2, 8)) for kk in ks[1:])
    causal = layers.Mask(causal=True)
    mask = causal.dense(6, 6)  # [1, 1, 1, 6, 6]
    out = layers.attend(q, k, v, causal)
    k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k_rep) / np.sqrt(8)
    scores = jnp.where(mask[:, 0], scores, -jnp.inf)
    expected = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v_rep)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda q, k, v: (layers.attend(q, k, v, causal) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda q, k, v: (jnp.einsum(
        "bhts,bshd->bthd", jax.nn.softmax(jnp.where(mask[:, 0], jnp.einsum(
            "bthd,bshd->bhts", q, jnp.repeat(k, 2, 2)) / np.sqrt(8), -jnp.inf), axis=-1),
        jnp.repeat(v, 2, 2)) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
