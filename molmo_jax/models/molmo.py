"""Molmo: ViT -> connector -> image features added to the token embeddings -> decoder LLM.

Inputs follow the original's batch layout (padding = -1 everywhere):
  input_ids        [B, T]            int, -1 = padding
  images           [B, C, P, 588]    float, crops of all -1 = padding crops
  image_masks      [B, C, P]         float, as the preprocessor gives them (one-crop shift included)
  image_input_idx  [B, C, tokens]    int, position of each pooled feature; < 0 = skip

The connector (docs/architecture.md#4-connector): ViT features [B, C, P, kD] -> zero the
batch-padding crops -> + pad embeddings chosen by the image masks -> pool each 2x2 window with one
attention whose query is the window mean -> SwiGLU projector -> [B, C, tokens_per_crop, d_model].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax import config as config_lib
from molmo_jax.layers.attention import attention_mask, positions_from_mask
from molmo_jax.layers.core import Dense, init_mode, param
from molmo_jax.layers.decoder import Decoder
from molmo_jax.layers.mlp import swiglu
from molmo_jax.layers.pooling import attention_pool, grid_windows, window_query
from molmo_jax.layers.vit import VisionTransformer

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
        """Zero batch-padding crops (all -1), then add the padding embeddings (docs/architecture.md#4-connector).

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
        return grid_windows(features, config_lib.patches_per_side(self.cfg), (c.pool_h, c.pool_w))

    def pool(self, win):
        """[N, w, F] windows -> [N, out]."""
        kind = self.cfg.connector.pooling
        if kind == "stack":
            return win.reshape(win.shape[0], -1)
        if kind == "none":
            return win[:, 0]
        return attention_pool(self.wq, self.wk, self.wv, self.wo, win, self.pool_query(win))

    def pool_query(self, win):
        return window_query(win, mean=self.cfg.connector.pooling == "attention_meanq")

    def project(self, x):
        if self.cfg.connector.projector == "mlp":
            return swiglu(self.w1, self.w3, self.w2, x)
        return self.w1(x)

    def __call__(self, features, images, image_masks, dropout_rng=None):
        b, n = features.shape[:2]
        x = self.add_pad_embed(features, images, image_masks)
        rate = self.cfg.connector.image_feature_dropout
        if dropout_rng is not None and rate > 0:  # elementwise, on the padded features (docs/architecture.md#4-connector)
            keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        pooled = self.pool(self.windows(x))
        pooled = pooled.reshape(b, n, -1, pooled.shape[-1])
        return self.project(pooled)


class Molmo(nnx.Module):
    # Batch arrays the model reads by name: for the prompt (generation), and for training.
    PROMPT_INPUTS = ("input_ids", "images", "image_masks", "image_input_idx")
    INPUTS = PROMPT_INPUTS + ("position_ids", "subsegment_ids")

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        with init_mode(cfg.get("init", "normal")):
            self.vision = VisionTransformer(cfg, rngs=rngs)
            self.connector = Connector(cfg, rngs=rngs)
            self.llm = Decoder(cfg, rngs=rngs)

    # -- pieces, also used by tests and tools --------------------------------------------------
    def vit_features(self, images):
        """[B, C, P, 588] -> [B, C, P, k*D] concatenated features of the selected ViT layers."""
        b, c, p, f = images.shape
        feats = self.vision(images.reshape(b * c, p, f).astype(self.vision.dtype))
        return feats.reshape(b, c, p, -1)

    def image_features(self, images, image_masks, dropout_rng=None):
        """Connector output [B, C, tokens_per_crop, d_model]."""
        return self.connector(self.vit_features(images), images, image_masks, dropout_rng)

    def embed_inputs(self, input_ids, images=None, image_masks=None, image_input_idx=None, dropout_rng=None):
        """Token embeddings with the image features *added* at image_input_idx (docs/architecture.md#embedding-and-image-features)."""
        x = self.llm.embed(input_ids)
        if images is None:
            return x
        feats = self.image_features(images, image_masks, dropout_rng)
        b, t, d = x.shape
        feats = feats.reshape(b, -1, d).astype(x.dtype)
        idx = image_input_idx.reshape(b, -1)
        idx = jnp.where(idx < 0, t, idx)  # negative = skip; out of range + mode="drop" never wraps
        return x.at[jnp.arange(b)[:, None], idx].add(feats, mode="drop")

    def embed_batch(self, batch: dict):
        """`embed_inputs` of a batch dict (its PROMPT_INPUTS)."""
        return self.embed_inputs(batch["input_ids"], batch.get("images"), batch.get("image_masks"),
                                 batch.get("image_input_idx"))

    def token_groups(self, batch: dict):
        """No prompt tokens attend to each other both ways (the mask is causal)."""
        return None

    # -- forward --------------------------------------------------------------------------------
    def __call__(self, input_ids, images=None, image_masks=None, image_input_idx=None, *,
                 position_ids=None, subsegment_ids=None, response_mask=None, dropout_rng=None,
                 return_hidden=False, return_logits=True):
        """Returns a dict with `hidden` (after ln_f), `logits` [B, T, embedding_size] and, with
        `return_hidden`, `hidden_states` (input of each block plus the final one, as the golden
        `llm_hidden_states`) and `input_embeddings`."""
        valid = input_ids != -1
        if position_ids is None:
            position_ids = positions_from_mask(valid)
        mask = attention_mask(valid, subsegment_ids)
        image_rng = None
        if dropout_rng is not None:
            dropout_rng, image_rng = jax.random.split(dropout_rng)
        x = self.embed_inputs(input_ids, images, image_masks, image_input_idx, image_rng)
        return self.llm.outputs(x, position_ids, mask, response_mask=response_mask, dropout_rng=dropout_rng,
                                return_hidden=return_hidden, return_logits=return_logits)
