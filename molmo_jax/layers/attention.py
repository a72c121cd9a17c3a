"""Attention: the masked softmax core, the masks, and the decoder's attention layer (RoPE: `layers.rope`).

One attention serves training, prefill and decode. Without a cache, `Attention` attends over the
keys of its own input; with a `KVCache` it writes its keys and values into the cache at
`cache_index` and attends over every slot of the cache (the caller's mask says which slots are
valid). The cache layout is [batch, kv_heads, slots, head_dim], which a decode step reads in place.

Masks are kept as structure (`Mask`: causal or not, valid keys, subsegments, bidirectional groups), so
that the core can
either build the boolean [T, S] mask and run the dense softmax (`impl` "dense", what CPUs run fastest)
or hand the structure to a fused kernel that never writes T x T scores to memory ("fused":
`layers.fused_attention`, splash attention on TPU, cuDNN on GPU; "auto" picks by platform).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.layers.core import Dense, residual_out_std
from molmo_jax.layers.norms import RMSNorm
from molmo_jax.layers.rope import default_frequencies, rope, scaled_frequencies


@jax.custom_jvp
def softmax(x):
    """Softmax over the last axis whose derivative reads only its output: dy = y * (dx - sum(y dx)).

    jax.nn.softmax differentiates through exp, sum and divide unless the global flag
    `jax_softmax_custom_jvp` is set, so its backward pass streams several T x T tensors through memory
    per attention layer; with this rule it streams one. On bench-s's ViT attention (20 crops x 4 heads
    x 577^2 scores) forward + backward is ~25% faster on a CPU (docs/benchmarks.md)."""
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = softmax(x)
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


# Key/value layouts: "bshd" = [B, S, Hkv, hd] (keys computed from the input, training and the ViT);
# "bhsd" = [B, Hkv, S, hd] (the KV cache).
_SCORES = {"bshd": "btkgd,bskd->bkgts", "bhsd": "btkgd,bksd->bkgts"}
_MIX = {"bshd": "bkgts,bskd->btkgd", "bhsd": "bkgts,bksd->btkgd"}


IMPLEMENTATIONS = ("dense", "fused", "auto")


def check_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return impl


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may see: key index <= query index when `causal`; only keys whose
    `kv_valid` [B, S] is True; for packed conversations (`segments` [B, S]), query q sees key k only
    if segments[q] <= segments[k] (docs/architecture.md#packing); and, on top of `causal`, query q
    also sees every key of its own group (`groups` [B, S], >= 0; -1 = no group), so the tokens of an
    image attend to each other both ways (Molmo2). `segments` and `groups` run over the keys, the
    queries being the first T of them (as `causal` has it). None everywhere = every key."""
    causal: bool = False
    kv_valid: jax.Array | None = None
    segments: jax.Array | None = None
    groups: jax.Array | None = None

    def dense(self, t: int, s: int):
        """The boolean mask, [B, 1, 1, T, S] (broadcast over kv heads and groups), or None."""
        if not self.causal and self.kv_valid is None and self.segments is None:
            return None
        mask = jnp.tril(jnp.ones((t, s), dtype=bool))[None] if self.causal else jnp.ones((1, t, s), bool)
        if self.causal and self.groups is not None:
            g = self.groups
            mask = mask | ((g[:, :t, None] == g[:, None, :s]) & (g[:, :t, None] >= 0))
        if self.kv_valid is not None:
            mask = mask & self.kv_valid[:, None, :]
        if self.segments is not None:
            mask = mask & (self.segments[:, :t, None] <= self.segments[:, None, :s])
        return mask[:, None, None]


def attend(q, k, v, mask: Mask | None = None, dropout_rate: float = 0.0, dropout_rng=None,
           kv_layout: str = "bshd", impl: str = "dense"):
    """Multi-head attention core with grouped-query heads, softmax in float32.

    q: [B, T, Hq, hd]; k, v: [B, S, Hkv, hd] (or [B, Hkv, S, hd] with kv_layout "bhsd"); mask: which
    keys each query may see. Query head h reads kv head h // (Hq / Hkv), the original's
    repeat_interleave, done by reshaping instead of copying K/V. `impl` (IMPLEMENTATIONS): "fused"
    runs a kernel that keeps the scores on chip (no dropout there); "auto" is fused on TPU and GPU.
    """
    if check_impl(impl) != "dense" and kv_layout == "bshd" and not (dropout_rate > 0.0 and dropout_rng is not None):
        from molmo_jax.layers import fused_attention

        kernel = fused_attention.kernel_for(impl, q.dtype)
        if kernel is not None:
            return kernel(q, k, v, mask or Mask())
    mask = mask.dense(q.shape[1], k.shape[1] if kv_layout == "bshd" else k.shape[2]) if mask is not None else None
    b, t, hq, hd = q.shape
    hkv = k.shape[2] if kv_layout == "bshd" else k.shape[1]
    q = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum(_SCORES[kv_layout], q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = softmax(scores)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum(_MIX[kv_layout], probs.astype(v.dtype), v)
    return out.reshape(b, t, hq, hd)


# ------------------------------------------------------------------------------------------------
# Masks and positions (padding is -1 in input_ids; docs/architecture.md#masks-and-positions)

def positions_from_mask(valid):
    """clamp(cumsum(mask) - 1, 0): right padding repeats the last valid position."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(valid, subsegment_ids=None) -> Mask:
    """The decoder's mask over a sequence: causal, no padded keys, and, for packed examples, query q
    sees key k only if subsegment[q] <= subsegment[k]."""
    return Mask(causal=True, kv_valid=valid, segments=subsegment_ids)


# ------------------------------------------------------------------------------------------------
# The decoder's attention layer and its cache

class KVCache(NamedTuple):
    """One layer's keys and values (after RoPE) for `slots` positions, [B, kv_heads, slots, head_dim]."""
    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, batch: int, kv_heads: int, slots: int, head_dim: int, dtype) -> "KVCache":
        zeros = jnp.zeros((batch, kv_heads, slots, head_dim), dtype)
        return cls(zeros, zeros)

    def write(self, k, v, index) -> "KVCache":
        """Keys/values [B, T, Hkv, hd] written at slots index..index+T-1."""
        put = lambda cache, new: jax.lax.dynamic_update_slice(  # noqa: E731
            cache, new.transpose(0, 2, 1, 3).astype(cache.dtype), (0, 0, index, 0))
        return KVCache(put(self.k, k), put(self.v, v))


QK_NORMS = ("olmo", "qwen3")  # one RMSNorm over the whole projected q (k), or one per head


class Attention(nnx.Module):
    """Grouped-query self-attention of a decoder: q/k/v projections with a heads axis, optional
    clipping and qk-norm (`llm.qk_norm_type` "olmo": over the whole projected width, before the head
    split; "qwen3": per head), rotate-half RoPE, optionally scaled (`llm.rope_scaling`) on the layers
    `llm.rope_scaling_layers` lists (all when None; the others unscaled)."""

    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack, impl: str = "auto"):
        d, hq, hkv, hd = lcfg.d_model, lcfg.n_heads, lcfg.n_kv_heads, lcfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.wq = Dense(d, (hq, hd), ("embed",), ("heads", "head_dim"), use_bias=lcfg.qkv_bias, **kw)
        self.wk = Dense(d, (hkv, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=lcfg.qkv_bias, **kw)
        self.wv = Dense(d, (hkv, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=lcfg.qkv_bias, **kw)
        self.wo = Dense((hq, hd), d, ("heads", "head_dim"), ("embed",), std=residual_out_std(hq * hd, lcfg.n_layers),
                        **kw)
        self.per_head_norm = lcfg.get("qk_norm_type", "olmo") == "qwen3"
        if lcfg.get("qk_norm_type", "olmo") not in QK_NORMS:
            raise ValueError(f"llm.qk_norm_type={lcfg.qk_norm_type!r}; choose one of {', '.join(QK_NORMS)}")
        if lcfg.qk_norm and self.per_head_norm:
            self.q_norm = RMSNorm(hd, lcfg.norm_eps, "head_dim", param_dtype=param_dtype, stack=stack)
            self.k_norm = RMSNorm(hd, lcfg.norm_eps, "head_dim", param_dtype=param_dtype, stack=stack)
        elif lcfg.qk_norm:
            self.q_norm = RMSNorm(hq * hd, lcfg.norm_eps, "q_norm", param_dtype=param_dtype, stack=stack)
            self.k_norm = RMSNorm(hkv * hd, lcfg.norm_eps, "kv_norm", param_dtype=param_dtype, stack=stack)
        else:
            self.q_norm = self.k_norm = None
        self.clip_qkv = lcfg.clip_qkv
        self.theta = lcfg.rope_theta
        self.rope_freqs, self.rope_factor, self.rope_layers = rope_plan(lcfg)
        self.dropout = lcfg.attention_dropout
        self.impl = check_impl(impl)

    def rotate(self, x, positions, layer=None):
        """RoPE of this layer (`layer`: its index, needed when only some layers are scaled)."""
        if self.rope_freqs is None:
            return rope(x, positions, self.theta)
        inv, scale = jnp.asarray(self.rope_freqs, jnp.float32), jnp.float32(self.rope_factor)
        if self.rope_layers is not None:
            if layer is None:
                raise ValueError("RoPE scaled on some layers only: the layer index is needed")
            scaled = jnp.asarray(self.rope_layers)[layer]
            inv = jnp.where(scaled, inv, default_frequencies(x.shape[-1], self.theta))
            scale = jnp.where(scaled, scale, jnp.float32(1.0))
        return rope(x, positions, self.theta, inv, scale)

    def __call__(self, x, positions, mask, cache: KVCache | None = None, cache_index=None, dropout_rng=None,
                 layer=None):
        """x [B, T, d], positions [B, T], mask a `Mask` over the T keys, or with a cache over its slots
        (the new keys/values go to slots cache_index..cache_index+T-1); `layer` this layer's index.
        Returns (output [B, T, d], the updated cache or None)."""
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.clip_qkv:
            q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
        if self.q_norm is not None and self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:
            q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        q, k = self.rotate(q, positions, layer), self.rotate(k, positions, layer)
        rate = self.dropout if dropout_rng is not None else 0.0
        if cache is None:
            out = attend(q, k, v, mask, rate, dropout_rng, impl=self.impl)
        else:
            cache = cache.write(k, v, cache_index)
            out = attend(q, cache.k, cache.v, mask, rate, dropout_rng, kv_layout="bhsd")
        return self.wo(out), cache


def rope_plan(lcfg):
    """(scaled inverse frequencies as a tuple or None, attention factor, per-layer "scaled" flags or
    None = every layer alike) of a decoder config. Unscaled RoPE gives (None, 1.0, None)."""
    params = lcfg.get("rope_scaling") or {}
    params = params.to_dict() if hasattr(params, "to_dict") else dict(params)
    if not params or params.get("rope_type", params.get("type", "default")) == "default":
        return None, 1.0, None
    layers = lcfg.get("rope_scaling_layers")
    flags = None if layers is None else tuple(i in set(layers) for i in range(lcfg.n_layers))
    if flags is not None and not any(flags):
        return None, 1.0, None
    inv, factor = scaled_frequencies(lcfg.head_dim, lcfg.rope_theta, params, lcfg.max_sequence_length)
    return tuple(float(f) for f in inv), factor, (None if flags is None or all(flags) else flags)
