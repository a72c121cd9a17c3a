"""The training loss: float32 token cross-entropy normalised by the loss weights, and the z-loss.

`loss_fn` reduces full logits; `sparse_loss` applies the output head only at weighted positions
(what the trainer uses). Both follow the original's reduction (docs/architecture.md#loss).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from molmo_jax.sharding import constrain

Z_LOSS_WEIGHT = 1e-4
# What a training batch may hold (padding -1): Molmo's Collator layout, then Molmo2's (its crops flat
# over the batch, `image_token_pooling` indexing their patches batch-wide).
BATCH_KEYS = ("input_ids", "target_tokens", "loss_masks", "position_ids", "subsegment_ids", "images",
              "image_masks", "image_input_idx", "pixel_values", "image_token_pooling", "pixel_values_videos",
              "video_token_pooling", "mm_token_type_ids")


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

    `normalizer` overrides sum(w) (gradient accumulation uses the full batch's sum).
    Returns (loss, z_loss, sum of weights).
    """
    ce, z, w = token_losses(outputs["logits"], labels, loss_masks)
    denom = jnp.sum(w) if normalizer is None else normalizer
    denom = jnp.maximum(denom, 1e-8)
    return jnp.sum(ce) / denom, jnp.sum(z) / denom, jnp.sum(w)


def sparse_loss(head, hidden, labels, loss_masks, max_loss_tokens: int, normalizer=None, chunk_tokens: int = 0):
    """The same loss as `loss_fn`, with the output head (`head(hidden) -> logits`) applied only where
    the weight is > 0.

    Static shapes: per example, the first K = ceil(max_loss_tokens / B) weighted positions are
    gathered (`jnp.nonzero(size=K)` row by row), so the head and the softmax cost B x K x vocab
    instead of B x T x vocab. Selecting per row (not over the flattened batch) keeps the batch
    sharding: the gathered states and the logits stay split over the batch axes and the vocabulary
    over `tensor`. Positions beyond K in a row are dropped and counted in `n_dropped`.

    `chunk_tokens` > 0 runs the head on about that many positions of the batch at a time
    (`lax.map` over chunks of the K positions, each rematerialised), so the float32 logits and
    their gradient exist for one chunk only: B x K x vocab x 4 bytes (128 MB at bench-s) becomes
    one chunk's share. The sums are the same terms in another order.
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

    def chunk_sums(h, lab, w):
        ce, z, w = token_losses(constrain(head(h), ("batch", None, "act_vocab")), lab, w)
        return jnp.sum(ce), jnp.sum(z), jnp.sum(w)

    per_row = max(1, -(-int(chunk_tokens) // b)) if chunk_tokens else k
    if per_row >= k:
        ce, z, w = chunk_sums(h, lab, w)
    else:
        n = -(-k // per_row)
        pad = n * per_row - k  # padded positions carry weight 0
        h, lab, w = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=c)
                     for x, c in ((h, 0), (lab, -1), (w, 0)))
        split = lambda x: jnp.moveaxis(x.reshape((b, n, per_row) + x.shape[2:]), 1, 0)  # noqa: E731
        sums = jax.lax.map(lambda xs: jax.checkpoint(chunk_sums)(*xs), (split(h), split(lab), split(w)))
        ce, z, w = (jnp.sum(s) for s in sums)
    denom = jnp.maximum(w if normalizer is None else normalizer, 1e-8)
    n_dropped = jnp.sum(jnp.maximum(counts - k, 0))
    return ce / denom, z / denom, w, n_dropped


def training_loss(model, batch: dict, *, max_loss_tokens: int = 0, normalizer=None, dropout_rng=None,
                  loss_chunk_tokens: int = 0):
    """The trainer's objective on one (micro-)batch: (loss + z_loss, {loss, z_loss, weight,
    dropped_loss_tokens}). The head runs only at weighted positions (`sparse_loss`, at most
    `max_loss_tokens` of them; 0 = every position); `normalizer` is the whole batch's weight when
    this is one micro-batch of several; `loss_chunk_tokens` runs the head in chunks (`sparse_loss`). The model reads the batch arrays its family names (`INPUTS`);
    any other model input the batch holds (e.g. packed `subsegment_ids` for a family without packing)
    is refused rather than dropped."""
    names = type(model).INPUTS
    unread = [k for k in BATCH_KEYS if batch.get(k) is not None and k not in names + ("target_tokens", "loss_masks")]
    if unread:
        raise ValueError(f"{type(model).__name__} does not read {', '.join(unread)} (it reads {', '.join(names)})")
    inputs = {k: batch[k] for k in names if batch.get(k) is not None}
    out = model(**inputs, response_mask=batch["loss_masks"] > 0, dropout_rng=dropout_rng, return_logits=False)
    max_tokens = max_loss_tokens or batch["input_ids"].size
    loss, z, w, dropped = sparse_loss(model.llm.logits, out["hidden"], batch["target_tokens"], batch["loss_masks"],
                                      max_tokens, normalizer, chunk_tokens=loss_chunk_tokens)
    return loss + z, dict(loss=loss, z_loss=z, weight=w, dropped_loss_tokens=dropped)
