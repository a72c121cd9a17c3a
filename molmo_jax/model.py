"""The whole Molmo: ViT -> connector -> image features added to the token embeddings -> LLM.

Inputs follow the original's batch layout (padding = -1 everywhere):
  input_ids        [B, T]            int, -1 = padding
  images           [B, C, P, 588]    float, crops of all -1 = padding crops
  image_masks      [B, C, P]         float, as the preprocessor gives them (one-crop shift included)
  image_input_idx  [B, C, tokens]    int, position of each pooled feature; < 0 = skip
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from molmo_jax.connector import Connector
from molmo_jax.layers import init_mode
from molmo_jax.sharding import constrain
from molmo_jax.llm import Decoder
from molmo_jax.vit import VisionTransformer

Z_LOSS_WEIGHT = 1e-4
IMAGE_SUBSEGMENT = 10000  # subsegment id of the BOS and image tokens in packed examples (spec 6.6)


def positions_from_mask(valid):
    """clamp(cumsum(mask) - 1, 0): right padding repeats the last valid position (spec 10.5)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(valid, subsegment_ids=None):
    """Boolean [B, 1, 1, T, T] (broadcast over kv heads and groups): causal, no padded keys, and,
    for packed examples, query q sees key k only if subsegment[q] <= subsegment[k]."""
    t = valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None] & valid[:, None, :]
    if subsegment_ids is not None:
        mask = mask & (subsegment_ids[:, :, None] <= subsegment_ids[:, None, :])
    return mask[:, None, None]


class Molmo(nnx.Module):
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
        """Token embeddings with the image features *added* at image_input_idx (spec 5.4)."""
        x = self.llm.embed(input_ids)
        if images is None:
            return x
        feats = self.image_features(images, image_masks, dropout_rng)
        b, t, d = x.shape
        feats = feats.reshape(b, -1, d).astype(x.dtype)
        idx = image_input_idx.reshape(b, -1)
        idx = jnp.where(idx < 0, t, idx)  # negative = skip; out of range + mode="drop" never wraps
        return x.at[jnp.arange(b)[:, None], idx].add(feats, mode="drop")

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
        drop_rates = None
        if dropout_rng is not None:
            l = self.cfg.llm
            rates = jnp.full(input_ids.shape, l.residual_dropout, jnp.float32)
            if response_mask is not None:
                rates = jnp.where(response_mask, l.response_residual_dropout, rates)
            drop_rates = rates[..., None]
        h, hidden, _ = self.llm(x, position_ids, mask, drop_rates=drop_rates, dropout_rng=dropout_rng,
                                return_hidden=return_hidden)
        out = {"hidden": h}
        if return_logits:
            out["logits"] = self.llm.logits(h)
        if return_hidden:
            out["hidden_states"] = jnp.concatenate([hidden, h[None]], axis=0)
            out["input_embeddings"] = x
        return out


def token_losses(logits, labels, weights):
    """Per-token float32 cross-entropy and z-loss terms. labels < 0 carry no loss."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # Labels without loss may be ids the head cannot produce (image tokens, padding): read a valid
    # column for them (their weight is 0), never an out-of-range one (which would give NaN).
    safe = jnp.where((labels < 0) | (labels >= logits.shape[-1]), 0, labels)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    w = jnp.where(labels < 0, 0.0, jnp.maximum(weights, 0.0)).astype(jnp.float32)
    return (lse - picked) * w, Z_LOSS_WEIGHT * jnp.square(lse) * w, w


def loss_fn(outputs, labels, loss_masks, normalizer=None):
    """The original's reduction: sum(w * CE) / sum(w); the z-loss is normalised the same way.

    `normalizer` overrides sum(w) (gradient accumulation uses the full batch's sum, spec 13.4).
    Returns (loss, z_loss, sum of weights).
    """
    ce, z, w = token_losses(outputs["logits"], labels, loss_masks)
    denom = jnp.sum(w) if normalizer is None else normalizer
    denom = jnp.maximum(denom, 1e-8)
    return jnp.sum(ce) / denom, jnp.sum(z) / denom, jnp.sum(w)


def sparse_loss(model, hidden, labels, loss_masks, max_loss_tokens: int, normalizer=None):
    """The same loss as `loss_fn`, with the output head applied only where the weight is > 0.

    Static shapes: per example, the first K = ceil(max_loss_tokens / B) weighted positions are
    gathered (`jnp.nonzero(size=K)` row by row), so the head and the softmax cost B x K x vocab
    instead of B x T x vocab. Selecting per row (not over the flattened batch) keeps the batch
    sharding: the gathered states and the logits stay split over the batch axes and the vocabulary
    over `tensor`. Positions beyond K in a row are dropped and counted in `n_dropped`.
    """
    b, t, _ = hidden.shape
    k = max(1, min(t, -(-int(max_loss_tokens) // b)))
    weights = jnp.where(labels < 0, 0.0, jnp.maximum(loss_masks, 0.0))
    (pos,) = jax.vmap(lambda row: jnp.nonzero(row > 0, size=k, fill_value=0))(weights)
    counts = jnp.sum(weights > 0, axis=1)
    taken = jnp.arange(k)[None, :] < counts[:, None]
    h = constrain(jnp.take_along_axis(hidden, pos[..., None], axis=1), ("batch", None, "act_embed"))
    w = jnp.where(taken, jnp.take_along_axis(weights, pos, axis=1), 0.0)
    lab = jnp.where(taken, jnp.take_along_axis(labels, pos, axis=1), -1)
    logits = constrain(model.llm.logits(h), ("batch", None, "act_vocab"))
    ce, z, w = token_losses(logits, lab, w)
    denom = jnp.maximum(jnp.sum(w) if normalizer is None else normalizer, 1e-8)
    n_dropped = jnp.sum(jnp.maximum(counts - k, 0))
    return jnp.sum(ce) / denom, jnp.sum(z) / denom, jnp.sum(w), n_dropped


def create_model(cfg, seed: int = 0) -> Molmo:
    return Molmo(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg) -> Molmo:
    """The model with ShapeDtypeStructs instead of arrays: no memory is allocated."""
    return nnx.eval_shape(lambda: Molmo(cfg, rngs=nnx.Rngs(0)))


def count_params(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(x.size for x in jax.tree.leaves(state)))
