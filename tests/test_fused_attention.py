"""Fused attention (layers.fused_attention: splash attention, here in Pallas interpret mode on the CPU)
against the dense core, forward and gradients, for every mask the models use (Molmo2's bidirectional
image groups included)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import sharding
from molmo_jax.layers import fused_attention
from molmo_jax.layers.attention import Mask, attend, attention_mask

B, T, HQ, HKV, D = 2, 150, 4, 2, 16  # T pads to 256: padded queries and keys are masked


def inputs(dtype=jnp.float32, t=T):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, t, h, D)), dtype) for h in (HQ, HKV, HKV))
    valid = np.ones((B, t), bool)
    valid[0, t - 30:] = False   # right padding
    valid[1, :10] = False       # left padding
    # packed conversations of example 0: BOS + image tokens (subsegment 10000), then two conversations
    seg = np.where(valid, 1, -1).astype(np.int32)
    seg[0, :30], seg[0, 30:70], seg[0, 70:t - 30] = 10000, 1, 2
    return q, k, v, jnp.asarray(valid), jnp.asarray(seg)


def image_groups(t=T):
    """Molmo2's image tokens: example 0 has two images in one group (text between them), example 1
    two groups (the Mask allows any ids; -1 = text), one straddling its left padding."""
    groups = np.full((B, t), -1, np.int32)
    groups[0, 5:40], groups[0, 60:90] = 0, 0
    groups[1, 5:30], groups[1, 100:140] = 0, 1
    return jnp.asarray(groups)


def masks(valid, seg):
    return {"vit (full)": (Mask(), np.ones(valid.shape, bool)),
            "causal + padding": (attention_mask(valid), np.asarray(valid)),
            "packed": (attention_mask(valid, seg), np.asarray(valid)),
            "image groups": (Mask(causal=True, kv_valid=valid, groups=image_groups(valid.shape[1])),
                             np.asarray(valid))}


def test_image_groups_see_each_other_both_ways():
    """The dense mask of a Molmo2 prompt: causal, plus every pair of tokens in one group (either
    direction), never a padded key and never a text token's future."""
    _, _, _, valid, _ = inputs()
    groups = np.asarray(image_groups())
    dense = np.asarray(Mask(causal=True, kv_valid=valid, groups=jnp.asarray(groups)).dense(T, T))[:, 0, 0]
    q, kk = np.arange(T)[:, None], np.arange(T)[None, :]
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)
    np.testing.assert_array_equal(dense, ((kk <= q)[None] | same) & np.asarray(valid)[:, None, :])
    assert dense[0, 5, 89] and dense[0, 60, 39] and not dense[0, 45, 60] and not dense[1, 10, 100]


def compare(dtype, atol, grad_atol, mesh=None):
    q, k, v, valid, seg = inputs(dtype)
    for name, (mask, rows) in masks(valid, seg).items():
        keep = jnp.asarray(rows)[..., None, None]  # outputs of padded queries are never used

        def loss(impl):
            return lambda q, k, v: jnp.sum(jnp.where(keep, attend(q, k, v, mask, impl=impl), 0).astype(jnp.float32) ** 2)
        with sharding.use_mesh(mesh) if mesh is not None else _nothing():
            dense, fused = (jax.jit(lambda q, k, v, impl=impl: attend(q, k, v, mask, impl=impl))(q, k, v)
                            for impl in ("dense", "fused"))
            grads = [jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v) for impl in ("dense", "fused")]
        diff = jnp.where(keep, dense.astype(jnp.float32) - fused.astype(jnp.float32), 0)
        assert float(jnp.abs(diff).max()) <= atol, name
        for a, b in zip(*grads):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=grad_atol, rtol=0,
                                       err_msg=name)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_float32_matches_dense():
    """f32: both compute scores and softmax in f32; only the order of sums differs (measured 5e-7 on
    outputs of magnitude ~1, 7e-6 on gradients up to ~50), so 1e-5 / 5e-5."""
    compare(jnp.float32, atol=1e-5, grad_atol=5e-5)


def test_bfloat16_matches_dense():
    """bf16 inputs: the dense core rounds the probabilities to bf16 before the value product, the
    kernel keeps them in f32, and both round the output to bf16 (2^-8 relative): 3e-2 on outputs
    of magnitude ~1, gradients (sums over 150 positions of such terms) within 0.5."""
    compare(jnp.bfloat16, atol=3e-2, grad_atol=0.5)


def test_sharded_over_batch_and_heads_matches_dense():
    """Under a mesh the kernel runs per shard (shard_map): batch over data, heads over tensor."""
    mesh = sharding.make_mesh(dict(data=2, tensor=2, fsdp=2))
    compare(jnp.float32, atol=1e-5, grad_atol=5e-5, mesh=mesh)


def test_auto_is_dense_on_cpu_and_dropout_stays_dense():
    assert fused_attention.kernel_for("auto", jnp.float32) is None
    assert fused_attention.kernel_for("fused", jnp.float32) is not None
    with pytest.raises(ValueError, match="model.attention='flash'; choose one of dense, fused, auto"):
        attend(*inputs()[:3], impl="flash")


def test_score_buffers_are_found_in_hlo_text():
    hlo = ("%a = f32[2,4,577,577]{3,2,1,0} dot(...)\n%b = bf16[8,2304,128]{2,1,0} copy(...)\n"
           "%c = pred[2,1,2304,2304]{3,2,1,0} fusion(...)")
    assert fused_attention.score_buffers(hlo, (577, 2304)) == ["f32[2,4,577,577]"]
