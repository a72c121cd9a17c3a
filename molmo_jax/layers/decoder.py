"""The decoder LLM: a stack of pre-norm or post-norm blocks (attention + SwiGLU MLP or MoE) over
token embeddings, a final RMSNorm and the output head.

Attention weights are kept per projection with a heads axis ([embed, heads, head_dim]) rather than
the original's fused `att_proj`, so tensor parallelism can split heads; the weight mappings fuse
and split (q | k | v, and up | gate for `ff_proj`). All blocks are stacked on a `layers` axis and
run with `lax.scan`; generation runs them one by one (`molmo_jax.generate`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.layers.attention import Attention
from molmo_jax.layers.core import Dense, embedding_std, param
from molmo_jax.layers.mlp import MLP, MoE
from molmo_jax.layers.norms import RMSNorm
from molmo_jax.layers.scan import scan_layers
from molmo_jax.sharding import constrain


class Block(nnx.Module):
    def __init__(self, lcfg, *, dtype, param_dtype, rngs, stack, attention="auto"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
        self.norm_after = lcfg.norm_after
        self.attn_norm = RMSNorm(lcfg.d_model, lcfg.norm_eps, param_dtype=param_dtype, stack=stack)
        self.ff_norm = RMSNorm(lcfg.d_model, lcfg.norm_eps, param_dtype=param_dtype, stack=stack)
        self.attn = Attention(lcfg, impl=attention, **kw)
        self.ffn = MoE(lcfg, **kw) if lcfg.moe_num_experts else MLP(lcfg, **kw)

    def __call__(self, x, positions, mask, drop_rates=None, rng=None, cache=None, cache_index=None, layer=None):
        """`layer`: this block's index (read by RoPE scaled on some layers only)."""
        rngs = jax.random.split(rng, 3) if rng is not None else (None, None, None)
        if self.norm_after:  # OLMo-7B-1024: norms on the sublayer outputs, none on the inputs
            a, cache = self.attn(x, positions, mask, cache, cache_index, rngs[2], layer)
            h = x + _dropout(self.attn_norm(a), drop_rates, rngs[0])
            return h + _dropout(self.ff_norm(self.ffn(h)), drop_rates, rngs[1]), cache
        a, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, rngs[2], layer)
        h = x + _dropout(a, drop_rates, rngs[0])
        return h + _dropout(self.ffn(self.ff_norm(h)), drop_rates, rngs[1]), cache


def residual_drop_rates(lcfg, shape, response_mask=None):
    """Per-position residual dropout rates [B, T, 1]: `residual_dropout`, or on response tokens
    `response_residual_dropout` (docs/architecture.md#dropout)."""
    rates = jnp.full(shape, lcfg.residual_dropout, jnp.float32)
    if response_mask is not None:
        rates = jnp.where(response_mask, lcfg.response_residual_dropout, rates)
    return rates[..., None]


def _dropout(y, rates, rng):
    """Residual dropout with a per-position rate [B, T, 1] (response dropout,
    docs/architecture.md#dropout)."""
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
        self.blocks = Block(l, dtype=dtype, param_dtype=pdt, rngs=rngs, stack=l.n_layers,
                            attention=cfg.get("attention", "auto"))
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

    def __call__(self, x, positions, mask, *, drop_rates=None, dropout_rng=None, return_hidden=False):
        """x: input embeddings [B, T, d]. Returns (final hidden after ln_f, hidden states or None):
        with `return_hidden`, the input of every block, [n_layers, B, T, d]."""
        n = self.cfg.llm.n_layers
        keys = jax.random.split(dropout_rng, n) if dropout_rng is not None else None
        # the layer index rides along only when RoPE is scaled on some layers (Molmo2-O)
        layers = jnp.arange(n) if self.blocks.attn.rope_layers is not None else None

        def body(h, block, xs):
            key, layer = xs
            h = constrain(h, ("batch", "seq", "act_embed"))  # block boundary: batch-sharded activations
            out, _ = block(h, positions, mask, drop_rates, key, layer=layer)
            return out, (h if return_hidden else None)

        x, hidden = scan_layers(body, x, self.blocks, xs=(keys, layers), remat=self.cfg.remat,
                                unroll=self.cfg.get("scan_unroll", 1))
        return self.ln_f(x), hidden

    def outputs(self, x, positions, mask, *, response_mask=None, dropout_rng=None, return_hidden=False,
                return_logits=True) -> dict:
        """What every model family returns, from input embeddings x [B, T, d]: `hidden` (after ln_f),
        `logits`, and with `return_hidden` `hidden_states` (input of each block plus the final one)
        and `input_embeddings`. With `dropout_rng`, residual dropout at the rates of the config."""
        drop_rates = None
        if dropout_rng is not None:
            drop_rates = residual_drop_rates(self.cfg.llm, x.shape[:2], response_mask)
        h, hidden = self(x, positions, mask, drop_rates=drop_rates, dropout_rng=dropout_rng,
                         return_hidden=return_hidden)
        out = {"hidden": h}
        if return_logits:
            out["logits"] = self.logits(h)
        if return_hidden:
            out["hidden_states"] = jnp.concatenate([hidden, h[None]], axis=0)
            out["input_embeddings"] = x
        return out

    def logits(self, h):
        return self.ff_out(h)
