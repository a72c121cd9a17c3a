"""The decoder LLM (spec section 10): dense (OLMo / Qwen2) and mixture-of-experts (OLMoE) blocks.

Attention weights are kept per projection with a heads axis ([embed, heads, head_dim]) rather than
the original's fused `att_proj`, so tensor parallelism can split heads; the converter fuses and
splits (q | k | v, and up | gate for `ff_proj`). All blocks are stacked on a `layers` axis and run
with `lax.scan`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.sharding import constrain
from molmo_jax.layers import (Dense, RMSNorm, attend, embedding_std, kernel_std, param, residual_out_std, rope,
                              scan_layers)


class Attention(nnx.Module):
    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack):
        d, hq, hkv, hd = lcfg.d_model, lcfg.n_heads, lcfg.n_kv_heads, lcfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.wq = Dense(d, (hq, hd), ("embed",), ("heads", "head_dim"), use_bias=lcfg.qkv_bias, **kw)
        self.wk = Dense(d, (hkv, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=lcfg.qkv_bias, **kw)
        self.wv = Dense(d, (hkv, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=lcfg.qkv_bias, **kw)
        self.wo = Dense((hq, hd), d, ("heads", "head_dim"), ("embed",), std=residual_out_std(hq * hd, lcfg.n_layers),
                        **kw)
        if lcfg.qk_norm:  # RMSNorm over the whole projected q / k, before the head split (spec 10.3)
            self.q_norm = RMSNorm(hq * hd, lcfg.norm_eps, "q_norm", param_dtype=param_dtype, stack=stack)
            self.k_norm = RMSNorm(hkv * hd, lcfg.norm_eps, "kv_norm", param_dtype=param_dtype, stack=stack)
        else:
            self.q_norm = self.k_norm = None
        self.clip_qkv = lcfg.clip_qkv
        self.theta = lcfg.rope_theta
        self.dropout = lcfg.attention_dropout

    def __call__(self, x, positions, mask, cache=None, cache_index=None, dropout_rng=None):
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.clip_qkv:
            q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        if cache is not None:  # write the new keys/values (post-RoPE) at slot cache_index
            ck, cv = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            cache = (k, v)
        out = attend(q, k, v, mask, self.dropout if dropout_rng is not None else 0.0, dropout_rng)
        return self.wo(out), cache


class MLP(nnx.Module):
    """SwiGLU: silu(gate(x)) * up(x). The original's fused ff_proj is [up | gate] (spec pitfall 21)."""

    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack):
        d, f = lcfg.d_model, lcfg.mlp_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.w_up = Dense(d, f, ("embed",), ("mlp",), **kw)
        self.w_gate = Dense(d, f, ("embed",), ("mlp",), **kw)
        self.w_down = Dense(f, d, ("mlp",), ("embed",), std=residual_out_std(f, lcfg.n_layers), **kw)

    def __call__(self, x):
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nnx.Module):
    """OLMoE mixture of experts: softmax over all experts, top-k, no renormalisation, dropless."""

    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack):
        d, f, e = lcfg.d_model, lcfg.mlp_dim, lcfg.moe_num_experts
        self.top_k, self.impl = lcfg.moe_top_k, lcfg.moe_impl
        if self.impl not in ("ragged", "dense"):
            raise ValueError(f"llm.moe_impl={self.impl!r}; choose 'ragged' or 'dense'")
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
        if self.impl == "dense":  # every expert on every token: exact and simple, for small models
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


class Block(nnx.Module):
    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.norm_after = lcfg.norm_after
        self.attn_norm = RMSNorm(lcfg.d_model, lcfg.norm_eps, param_dtype=param_dtype, stack=stack)
        self.ff_norm = RMSNorm(lcfg.d_model, lcfg.norm_eps, param_dtype=param_dtype, stack=stack)
        self.attn = Attention(lcfg, **kw)
        self.ffn = MoE(lcfg, **kw) if lcfg.moe_num_experts else MLP(lcfg, **kw)

    def __call__(self, x, positions, mask, drop_rates=None, rng=None, cache=None, cache_index=None):
        rngs = jax.random.split(rng, 3) if rng is not None else (None, None, None)
        if self.norm_after:  # OLMo-7B-1024: norms on the sublayer outputs, none on the inputs
            a, cache = self.attn(x, positions, mask, cache, cache_index, rngs[2])
            h = x + _dropout(self.attn_norm(a), drop_rates, rngs[0])
            return h + _dropout(self.ff_norm(self.ffn(h)), drop_rates, rngs[1]), cache
        a, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, rngs[2])
        h = x + _dropout(a, drop_rates, rngs[0])
        return h + _dropout(self.ffn(self.ff_norm(h)), drop_rates, rngs[1]), cache


def _dropout(y, rates, rng):
    """Residual dropout with a per-position rate [B, T, 1] (response dropout, spec 13.5)."""
    if rng is None or rates is None:
        return y
    keep_p = 1.0 - rates
    keep = jax.random.uniform(rng, y.shape) < keep_p
    return jnp.where(keep, y / keep_p.astype(y.dtype), 0).astype(y.dtype)


class Decoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        l = cfg.llm
        self.cfg = cfg
        dtype, pdt = cfg.dtype, cfg.param_dtype
        self.dtype = jnp.dtype(dtype)
        self.embedding = param(rngs, (l.embedding_size, l.d_model), ("vocab", "embed"), pdt, std=embedding_std())
        self.new_embedding = (param(rngs, (l.additional_vocab_size, l.d_model), (None, "embed"), pdt,
                                    std=embedding_std())
                              if l.additional_vocab_size else None)
        self.blocks = Block(l, dtype=dtype, param_dtype=pdt, rngs=rngs, stack=l.n_layers)
        self.ln_f = RMSNorm(l.d_model, l.norm_eps, param_dtype=pdt)
        self.ff_out = Dense(l.d_model, l.embedding_size, ("embed",), ("vocab",), dtype=dtype,
                            param_dtype=pdt, rngs=rngs)

    def embed(self, input_ids):
        """Lookup on concat(embedding, new_embedding) without building the concatenation."""
        ids = jnp.where(input_ids < 0, 0, input_ids)  # padding (-1) is embedded as id 0
        n_base = self.embedding.shape[0]
        x = jnp.take(self.embedding[...], jnp.minimum(ids, n_base - 1), axis=0)
        if self.new_embedding is not None:
            extra = jnp.take(self.new_embedding[...], jnp.clip(ids - n_base, 0, None), axis=0,
                             mode="clip")
            x = jnp.where((ids >= n_base)[..., None], extra, x)
        return x.astype(self.dtype)

    def __call__(self, x, positions, mask, *, drop_rates=None, dropout_rng=None, cache=None,
                 cache_index=None, return_hidden=False):
        """x: input embeddings [B, T, d]. Returns (final hidden after ln_f, hidden states, cache).

        hidden states (with `return_hidden`): the input of every block, [n_layers, B, T, d].
        cache: optional (k, v) stacked per layer, [n_layers, B, S, Hkv, hd] each.
        """
        n = self.cfg.llm.n_layers
        keys = jax.random.split(dropout_rng, n) if dropout_rng is not None else None

        def body(h, block, xs):
            key, layer_cache = xs
            h = constrain(h, ("batch", "seq", "act_embed"))  # block boundary: batch-sharded activations
            out, layer_cache = block(h, positions, mask, drop_rates, key, layer_cache, cache_index)
            return out, ((h if return_hidden else None), layer_cache)

        x, (hidden, cache) = scan_layers(body, x, self.blocks, xs=(keys, cache), remat=self.cfg.remat,
                                         unroll=self.cfg.get("scan_unroll", 1))
        return self.ln_f(x), hidden, cache

    def logits(self, h):
        return self.ff_out(h)
