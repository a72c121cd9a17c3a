"""The image encoder: a CLIP-style ViT (docs/architecture.md#3-vision-encoder).

Input: crops as flattened patches [N, P, 588] ((dy, dx, rgb) order, already normalised).
Patch embedding without bias, class token, learned positions, `pre_ln`, pre-norm residual blocks
with biased q/k/v/o and a quick_gelu MLP, and no final norm. The output is the concatenation of the
block outputs named by `vit_layers` (negative = from the end), CLS row dropped.

Molmo2's SigLIP2 tower is the same stack with other switches in `cfg.vit` (absent = CLIP's):
`class_token` and `pre_ln` False, `patch_bias` True, `n_kv_heads` (grouped-query heads).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax import config as config_lib
from molmo_jax.layers.attention import attend, check_impl
from molmo_jax.layers.core import ACTIVATIONS, Dense, embedding_std, param, residual_out_std
from molmo_jax.layers.norms import LayerNorm
from molmo_jax.layers.scan import scan_layers
from molmo_jax.sharding import constrain


class ViTBlock(nnx.Module):
    def __init__(self, vcfg, *, dtype, param_dtype, rngs, stack=0, attention="auto"):
        d, h, hd, m = vcfg.width, vcfg.n_heads, vcfg.head_dim, vcfg.mlp_dim
        hkv = vcfg.get("n_kv_heads", h)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack, use_bias=True)
        self.attention_norm = LayerNorm(d, vcfg.norm_eps, param_dtype=param_dtype, stack=stack)
        self.wq = Dense(d, (h, hd), ("vit_embed",), ("vit_heads", "head_dim"), **kw)
        self.wk = Dense(d, (hkv, hd), ("vit_embed",), ("vit_heads", "head_dim"), **kw)
        self.wv = Dense(d, (hkv, hd), ("vit_embed",), ("vit_heads", "head_dim"), **kw)
        self.wo = Dense((h, hd), d, ("vit_heads", "head_dim"), ("vit_embed",),
                        std=residual_out_std(h * hd, vcfg.n_layers), **kw)
        self.ffn_norm = LayerNorm(d, vcfg.norm_eps, param_dtype=param_dtype, stack=stack)
        self.w1 = Dense(d, m, ("vit_embed",), ("vit_mlp",), **kw)
        self.w2 = Dense(m, d, ("vit_mlp",), ("vit_embed",), std=residual_out_std(m, vcfg.n_layers), **kw)
        self.act = ACTIVATIONS[vcfg.activation]
        self.attention = check_impl(attention)

    def __call__(self, x):
        y = self.attention_norm(x)
        x = x + self.wo(attend(self.wq(y), self.wk(y), self.wv(y), impl=self.attention))
        return x + self.w2(self.act(self.w1(self.ffn_norm(x))))


class VisionTransformer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        v = cfg.vit
        self.cfg = cfg
        dtype, pdt = cfg.dtype, cfg.param_dtype
        ph, pw = config_lib.patches_per_side(cfg)
        patch_dim = v.patch_size * v.patch_size * 3
        self.class_token = v.get("class_token", True)
        self.patch_embedding = Dense(patch_dim, v.width, ("patch",), ("vit_embed",), dtype=dtype,
                                     param_dtype=pdt, rngs=rngs, use_bias=v.get("patch_bias", False))
        self.class_embedding = (param(rngs, (v.width,), ("vit_embed",), pdt, std=embedding_std())
                                if self.class_token else None)
        self.positional_embedding = param(rngs, (int(self.class_token) + ph * pw, v.width),
                                          ("vit_pos", "vit_embed"), pdt, std=embedding_std())
        self.pre_ln = LayerNorm(v.width, v.norm_eps, param_dtype=pdt) if v.get("pre_ln", True) else None
        self.blocks = ViTBlock(v, dtype=dtype, param_dtype=pdt, rngs=rngs, stack=v.n_layers,
                               attention=cfg.get("attention", "auto"))
        self.dtype = jnp.dtype(dtype)

    def embed(self, patches):
        """[N, P, 588] -> [N, 1+P, D] (P without a class token): the input of the first block."""
        n = patches.shape[0]
        x = self.patch_embedding(patches)
        if self.class_token:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.positional_embedding[...].astype(self.dtype)[None, : x.shape[1]]
        return self.pre_ln(x) if self.pre_ln is not None else x

    def __call__(self, patches, *, return_all_layers: bool = False):
        """Features of the selected layers, concatenated: [N, P, k*D] (CLS dropped).

        With `return_all_layers`, also returns every block output [n_layers, N, 1+P, D] (P without
        a class token).
        Blocks after the last selected one are not run.
        """
        chunk = int(self.cfg.vit.get("crop_chunk", 0) or 0)  # configs saved before the key lack it
        if not return_all_layers and 0 < chunk < patches.shape[0]:
            return self._in_chunks(patches, chunk)
        return self._features(patches, return_all_layers)

    def _features(self, patches, return_all_layers: bool = False):
        cfg = self.cfg
        layers = config_lib.resolved_vit_layers(cfg)
        x = self.embed(patches)
        unroll = cfg.get("scan_unroll", 1)  # configs saved before the key existed lack it

        def body(carry, block, _):
            out = block(constrain(carry, ("batch", None, "act_embed")))
            return out, (out if return_all_layers else None)

        if return_all_layers:
            _, hidden = scan_layers(body, x, self.blocks, remat=cfg.remat, unroll=unroll)
            feats = jnp.concatenate([hidden[i] for i in layers], axis=-1)
            return feats[:, int(self.class_token):], hidden
        # Run the blocks in segments that end at each needed layer, keeping those outputs.
        outputs, start = {}, 0
        for stop in sorted(set(l + 1 for l in layers)):
            x, _ = scan_layers(body, x, self.blocks, remat=cfg.remat, start=start, stop=stop,
                                unroll=unroll)
            outputs[stop - 1], start = x, stop
        feats = jnp.concatenate([outputs[i] for i in layers], axis=-1)
        return feats[:, int(self.class_token):]

    def _in_chunks(self, patches, chunk: int):
        """The same features, `chunk` crops at a time in a loop: the attention scores of one chunk are
        live at once instead of every crop's (what bounds a frozen tower's memory, e.g. under LoRA,
        where nothing of the loop is kept for the backward pass). The last chunk is zero-padded."""
        n = patches.shape[0]
        steps = -(-n // chunk)
        padded = jnp.pad(patches, ((0, steps * chunk - n),) + ((0, 0),) * (patches.ndim - 1))
        graphdef, state = nnx.split(self)

        def one(x):
            return nnx.merge(graphdef, state)._features(x)
        feats = jax.lax.map(one, padded.reshape(steps, chunk, *patches.shape[1:]))
        return feats.reshape(steps * chunk, *feats.shape[2:])[:n]
