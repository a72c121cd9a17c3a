"""Molmo2: SigLIP2 ViT -> adapter (attention pooling over index tables + SwiGLU projector) -> image
features added to the image-patch token embeddings -> Qwen3 / OLMo3 decoder, with the image tokens
of a prompt attending to each other both ways (docs/architecture.md#molmo2).

Inputs follow transformers' Molmo2 processor (its names; padding -1 in `input_ids`):
  input_ids            [B, T]     int, -1 = padding; `tokens.image_patch` marks where features go
  pixel_values         [N, P, p*p*3]  every crop of every image of the batch, in order
                                      (a leading [B, C] pair is flattened the same way)
  image_token_pooling  [M, K]     int: the patches (flat indices into the N*P of pixel_values) each
                                  image token pools; -1 = empty slot, a row of -1 makes no token
  pixel_values_videos, video_token_pooling: the same for the frames of videos (one or the other)
  mm_token_type_ids    [B, T]     1 = an image (or frame) token: all of them attend to each other
                                  both ways (one group, as transformers' block mask); absent = causal
  subsegment_ids       [B, T]     training rows packing several records (0, 1, ... in order, -1 =
                                  padding): a record sees only itself, its image tokens form their own
                                  group, and `position_ids` restart at each record; absent = one record
The k-th non-empty pooling row goes to the k-th `image_patch` token of the batch (rows in order);
`image_grids`, `image_num_crops` and `video_grids` only describe these tables and are not needed.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from molmo_jax import config as config_lib
from molmo_jax import config_molmo2
from molmo_jax.layers.attention import Mask, positions_from_mask
from molmo_jax.layers.core import Dense, init_mode
from molmo_jax.layers.decoder import Decoder
from molmo_jax.layers.mlp import swiglu
from molmo_jax.layers.pooling import attention_pool
from molmo_jax.layers.vit import VisionTransformer

IMAGE_TOKEN_TYPE = 1  # mm_token_type_ids of image and video-frame tokens


class Adapter(nnx.Module):
    """Pools the ViT features of the patches each index-table row names by one attention (query:
    the mean of the valid patches; empty slots masked), then projects with SwiGLU to d_model."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = cfg.connector
        if c.get("image_feature_dropout", 0.0):
            raise ValueError("connector.image_feature_dropout is not supported by the molmo2 family")
        feat, d, f = config_lib.vit_feature_dim(cfg), cfg.llm.d_model, config_lib.projector_dim(cfg)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        heads = ("vit_heads", "head_dim")
        self.wq = Dense(feat, (c.n_heads, c.head_dim), ("vit_feature",), heads, use_bias=True, **kw)
        self.wk = Dense(feat, (c.n_kv_heads, c.head_dim), ("vit_feature",), heads, use_bias=True, **kw)
        self.wv = Dense(feat, (c.n_kv_heads, c.head_dim), ("vit_feature",), heads, use_bias=True, **kw)
        self.wo = Dense((c.n_heads, c.head_dim), c.width, heads, ("vit_embed",), use_bias=True, **kw)
        self.w1 = Dense(c.width, f, ("vit_embed",), ("mlp",), **kw)   # gate
        self.w3 = Dense(c.width, f, ("vit_embed",), ("mlp",), **kw)   # up
        self.w2 = Dense(f, d, ("mlp",), ("embed",), **kw)             # down

    def __call__(self, features, pooling):
        """features [N, P, F] of every crop; pooling [M, K] flat patch indices (-1 = empty) ->
        [M, d_model] (rows without a valid patch are computed too and never used)."""
        flat = features.reshape(-1, features.shape[-1])
        valid = pooling >= 0
        members = jnp.take(flat, jnp.maximum(pooling, 0), axis=0) * valid[..., None].astype(flat.dtype)
        count = jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(flat.dtype)
        query = jnp.sum(members, axis=1, keepdims=True) / count[:, None, None]
        pooled = attention_pool(self.wq, self.wk, self.wv, self.wo, members, query, valid)
        return swiglu(self.w1, self.w3, self.w2, pooled)


class Molmo2(nnx.Module):
    # Batch arrays the model reads by name: for the prompt (generation), and for training.
    PROMPT_INPUTS = ("input_ids", "pixel_values", "image_token_pooling", "pixel_values_videos",
                     "video_token_pooling", "mm_token_type_ids")
    INPUTS = PROMPT_INPUTS + ("position_ids", "subsegment_ids")

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        parts = (VisionTransformer, Adapter, Decoder)  # Molmo's three, in its order
        with init_mode(cfg.get("init", "normal")):
            self.vision, self.connector, self.llm = (part(cfg, rngs=rngs) for part in parts)

    # -- pieces, also used by tests and tools --------------------------------------------------
    def image_features(self, pixel_values, pooling):
        """Adapter output [M, d_model] of every pooling row, and which rows make a token [M]."""
        patches = pixel_values.reshape(-1, *pixel_values.shape[-2:]).astype(self.vision.dtype)
        return self.connector(self.vision(patches), pooling), jnp.any(pooling >= 0, axis=-1)

    def embed_inputs(self, input_ids, pixel_values=None, image_token_pooling=None, pixel_values_videos=None,
                     video_token_pooling=None):
        """Token embeddings with the pooled features *added* at the image-patch tokens, in order."""
        x = self.llm.embed(input_ids)
        if pixel_values is not None and pixel_values_videos is not None:
            raise ValueError("pixel_values and pixel_values_videos are both given; a batch holds one or the other")
        pixels, pooling = ((pixel_values, image_token_pooling) if pixel_values is not None
                           else (pixel_values_videos, video_token_pooling))
        if pixels is None:
            return x
        if pooling is None:
            raise ValueError("pixel values without their token pooling table (image_token_pooling / "
                             "video_token_pooling)")
        feats, made = self.image_features(pixels, pooling)
        return add_at_tokens(x, input_ids == config_molmo2.image_patch_id(self.cfg), feats.astype(x.dtype), made)

    def embed_batch(self, batch: dict):
        """`embed_inputs` of a batch dict (its PROMPT_INPUTS by name)."""
        names = ("pixel_values", "image_token_pooling", "pixel_values_videos", "video_token_pooling")
        return self.embed_inputs(batch["input_ids"], **{k: batch.get(k) for k in names})

    def token_groups(self, batch: dict):
        """[B, T] group ids: for the image (and frame) tokens their record's `subsegment_ids` (0 without
        packing), -1 for text; None without `mm_token_type_ids` (causal, as transformers)."""
        types, records = batch.get("mm_token_type_ids"), batch.get("subsegment_ids")
        if types is None:
            return None
        record = jnp.zeros_like(types) if records is None else jnp.maximum(records, 0)
        return jnp.where(types == IMAGE_TOKEN_TYPE, record, -1).astype(jnp.int32)

    # -- forward --------------------------------------------------------------------------------
    def __call__(self, input_ids, pixel_values=None, image_token_pooling=None, pixel_values_videos=None,
                 video_token_pooling=None, mm_token_type_ids=None, *, position_ids=None, subsegment_ids=None,
                 response_mask=None, dropout_rng=None, return_hidden=False, return_logits=True):
        """Returns a dict with `hidden` (after ln_f), `logits` [B, T, vocab] and, with
        `return_hidden`, `hidden_states` (input of each block plus the final one) and
        `input_embeddings`."""
        valid = input_ids != -1
        if position_ids is None:
            position_ids = positions_from_mask(valid)
        # Records numbered in order: with the causal mask, "segment of the query <= segment of the key"
        # leaves each packed record only its own keys (docs/architecture.md#molmo2-packing).
        groups = self.token_groups(dict(mm_token_type_ids=mm_token_type_ids, subsegment_ids=subsegment_ids))
        mask = Mask(causal=True, kv_valid=valid, segments=subsegment_ids, groups=groups)
        x = self.embed_inputs(input_ids, pixel_values, image_token_pooling, pixel_values_videos, video_token_pooling)
        return self.llm.outputs(x, position_ids, mask, response_mask=response_mask, dropout_rng=dropout_rng,
                                return_hidden=return_hidden, return_logits=return_logits)


def add_at_tokens(x, is_patch, feats, made):
    """x [B, T, D] plus, at the k-th True of `is_patch` [B, T] (batch-major order), the k-th row of
    `feats` [M, D] whose `made` [M] is True. Surplus patch tokens (more than made rows) would read
    a wrong row: callers check the counts on the host (`check_token_counts`)."""
    b, t, d = x.shape
    m = feats.shape[0]
    rows = jnp.nonzero(made, size=m, fill_value=0)[0]
    flat = is_patch.reshape(-1)
    rank = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, m - 1)
    add = jnp.take(feats, jnp.take(rows, rank), axis=0)
    return x + jnp.where(flat[:, None], add, 0).reshape(b, t, d).astype(x.dtype)


def check_token_counts(cfg, batch: dict) -> None:
    """One clear error when the pooling rows that make tokens and the image-patch tokens of
    `input_ids` differ in number (host-side: numpy arrays)."""
    import numpy as np

    ids = np.asarray(batch["input_ids"])
    n_tokens = int(np.sum(ids == config_molmo2.image_patch_id(cfg)))
    for name in ("image_token_pooling", "video_token_pooling"):
        if batch.get(name) is not None:
            rows = int(np.sum(np.any(np.asarray(batch[name]) >= 0, axis=-1)))
            if rows != n_tokens:
                raise ValueError(f"{name} has {rows} non-empty rows but input_ids holds {n_tokens} image-patch "
                                 f"tokens (id {config_molmo2.image_patch_id(cfg)}); they must match")
            return
    if n_tokens:
        raise ValueError(f"input_ids holds {n_tokens} image-patch tokens but no pixel_values / "
                         "pixel_values_videos with their pooling table")
