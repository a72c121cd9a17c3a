"""The vision-language connector (spec section 9): pad embeddings, 2x2 pooling, projector.

ViT features [B, C, P, kD] -> (zero the batch-padding crops) -> + pad embeddings chosen by the
image masks -> pool each 2x2 window with one attention whose query is the window mean ->
SwiGLU projector -> [B, C, tokens_per_crop, d_model].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax import config as config_lib
from molmo_jax.layers import Dense, attend, param

POOLINGS = ("attention_meanq", "attention", "stack", "none")
PROJECTORS = ("mlp", "linear")
PADDING_EMBEDS = ("pad_and_partial_pad", "pad_embed", "regress", "none")


class Connector(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c, v = cfg.connector, cfg.vit
        for key, value, allowed in (("pooling", c.pooling, POOLINGS), ("projector", c.projector, PROJECTORS),
                                    ("padding_embed", c.padding_embed, PADDING_EMBEDS)):
            if value not in allowed:
                raise ValueError(f"connector.{key}={value!r} is not supported; choose one of {allowed}")
        if c.pooling == "none" and (c.pool_h, c.pool_w) != (1, 1):
            raise ValueError("connector.pooling='none' needs pool_h = pool_w = 1")
        self.cfg = cfg
        dtype, pdt = cfg.dtype, cfg.param_dtype
        feat = config_lib.vit_feature_dim(cfg)
        kw = dict(dtype=dtype, param_dtype=pdt, rngs=rngs)
        if c.padding_embed == "pad_and_partial_pad":
            self.pad_embed = param(rngs, (2, feat), (None, "vit_feature"), pdt)
        elif c.padding_embed in ("pad_embed", "regress"):
            self.pad_embed = param(rngs, (feat,), ("vit_feature",), pdt)
        else:
            self.pad_embed = None
        if c.pooling.startswith("attention"):
            h, hd = v.n_heads, v.head_dim
            self.wq = Dense(feat, (h, hd), ("vit_feature",), ("vit_heads", "head_dim"), use_bias=True, **kw)
            self.wk = Dense(feat, (h, hd), ("vit_feature",), ("vit_heads", "head_dim"), use_bias=True, **kw)
            self.wv = Dense(feat, (h, hd), ("vit_feature",), ("vit_heads", "head_dim"), use_bias=True, **kw)
            self.wo = Dense((h, hd), v.width, ("vit_heads", "head_dim"), ("vit_embed",), use_bias=True, **kw)
            proj_in = v.width
        elif c.pooling == "stack":
            proj_in = feat * c.pool_h * c.pool_w
        else:
            proj_in = feat
        d, f = cfg.llm.d_model, config_lib.projector_dim(cfg)
        if c.projector == "mlp":
            self.w1 = Dense(proj_in, f, ("vit_embed",), ("mlp",), **kw)
            self.w3 = Dense(proj_in, f, ("vit_embed",), ("mlp",), **kw)
            self.w2 = Dense(f, d, ("mlp",), ("embed",), **kw)
        else:
            self.w1 = Dense(proj_in, d, ("vit_embed",), ("embed",), **kw)

    def add_pad_embed(self, features, images, image_masks):
        """Zero batch-padding crops (all -1), then add the padding embeddings (spec 9.1).

        features: [B, C, P, kD]; images: [B, C, P, 588]; image_masks: [B, C, P] (used as given,
        including the original's one-crop shift).
        """
        is_pad_crop = jnp.all(images == -1, axis=(-1, -2))
        features = features * (~is_pad_crop)[..., None, None].astype(features.dtype)
        kind = self.cfg.connector.padding_embed
        if kind == "none":
            return features
        pad = self.pad_embed[...].astype(features.dtype)
        if kind == "pad_and_partial_pad":
            all_pad = (image_masks == 0).astype(features.dtype)[..., None]
            partial = ((image_masks < 1) & (image_masks != 0)).astype(features.dtype)[..., None]
            return features + pad[0] * all_pad + pad[1] * partial
        if kind == "pad_embed":
            return features + pad * (image_masks == 0).astype(features.dtype)[..., None]
        return features + pad * jnp.maximum(image_masks, 0).astype(features.dtype)[..., None]

    def windows(self, features):
        """[B, C, P, F] -> [B*C*th*tw, ph*pw, F]: row-major windows, members in (dy, dx) order."""
        c = self.cfg.connector
        b, n, p, f = features.shape
        gh, gw = config_lib.patches_per_side(self.cfg)
        x = features.reshape(b, n, gh, gw, f)
        pad_h, pad_w = (-gh) % c.pool_h, (-gw) % c.pool_w
        if pad_h or pad_w:  # odd grids are zero-padded at the bottom/right
            x = jnp.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        th, tw = (gh + pad_h) // c.pool_h, (gw + pad_w) // c.pool_w
        x = x.reshape(b, n, th, c.pool_h, tw, c.pool_w, f).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b * n * th * tw, c.pool_h * c.pool_w, f)

    def pool_query(self, win):
        return (jnp.mean(win, axis=1, keepdims=True) if self.cfg.connector.pooling == "attention_meanq"
                else win[:, :1])

    def pool(self, win):
        """[N, w, F] windows -> [N, out]."""
        kind = self.cfg.connector.pooling
        if kind == "stack":
            return win.reshape(win.shape[0], -1)
        if kind == "none":
            return win[:, 0]
        q = self.wq(self.pool_query(win))
        out = attend(q, self.wk(win), self.wv(win))
        return self.wo(out)[:, 0]

    def project(self, x):
        if self.cfg.connector.projector == "mlp":
            return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))
        return self.w1(x)

    def __call__(self, features, images, image_masks, dropout_rng=None):
        b, n = features.shape[:2]
        x = self.add_pad_embed(features, images, image_masks)
        rate = self.cfg.connector.image_feature_dropout
        if dropout_rng is not None and rate > 0:  # elementwise, on the padded features (spec 9.2)
            keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        pooled = self.pool(self.windows(x))
        pooled = pooled.reshape(b, n, -1, pooled.shape[-1])
        return self.project(pooled)
