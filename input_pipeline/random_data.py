"""Random batches in the model's exact layout: the `bench-s` workload and a data source for
trainer tests and benchmarks (no files needed).

The default is the shared benchmark's workload (shared/bench/README.md): 4 examples, each one
640x480 image (tiling 2x2 -> 5 crops incl. the global view) plus text, padded to 768 tokens, loss on
the text tokens. The token layout and `image_input_idx` follow the original's closed form (spec
4.6 / 5.1); pixel values and text ids are random.
"""
from __future__ import annotations

import numpy as np

from molmo_jax import config as config_lib

BATCH, SEQ_LEN, TILING = 4, 768, (2, 2)


def image_layout(cfg, rows: int, cols: int):
    """(number of image tokens, image_input_idx [1 + rows*cols, tokens_per_crop]) with BOS at 0."""
    ph, _ = config_lib.patches_per_side(cfg)
    t = -(-ph // cfg.connector.pool_h)                       # pooled tokens per crop side (12)
    margin = cfg.image.overlap_margins[0] // cfg.connector.pool_h  # pooled rows dropped per inner side
    idx = np.full((1 + rows * cols, t * t), -100, np.int32)
    a, b = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    idx[0] = (2 + a * (t + 1) + b).reshape(-1)               # BOS, <im_start>, then rows of t+1
    hi_start = 1 + (2 + t * (t + 1)) + 1                     # after BOS + global block + <im_start>

    def kept(i, n):
        lo = margin if i > 0 else 0
        hi = t - (margin if i < n - 1 else 0)
        return lo, hi

    heights = [kept(i, rows)[1] - kept(i, rows)[0] for i in range(rows)]
    widths = [kept(j, cols)[1] - kept(j, cols)[0] for j in range(cols)]
    total_w = sum(widths)
    for i in range(rows):
        for j in range(cols):
            y0, y1 = kept(i, rows)
            x0, x1 = kept(j, cols)
            crop = np.full((t, t), -100, np.int32)
            rr = sum(heights[:i]) + np.arange(y1 - y0)
            qq = sum(widths[:j]) + np.arange(x1 - x0)
            crop[y0:y1, x0:x1] = hi_start + rr[:, None] * (total_w + 1) + qq[None, :]
            idx[1 + i * cols + j] = crop.reshape(-1)
    n_tokens = (2 + t * (t + 1)) + (2 + sum(heights) * (total_w + 1))
    return n_tokens, idx


def bench_batch(cfg, batch=BATCH, seq_len=SEQ_LEN, text_len=None, seed=0):
    """Numpy batch in the model's layout, plus labels/loss masks on the text tokens."""
    rng = np.random.default_rng(seed)
    rows, cols = TILING
    n_img, idx = image_layout(cfg, rows, cols)
    ph, pw = config_lib.patches_per_side(cfg)
    n_crops, n_patches = idx.shape[0], ph * pw
    text = seq_len - 1 - n_img if text_len is None else text_len
    ids = np.full((batch, seq_len), -1, np.int32)
    special = config_lib.image_token_ids(cfg)
    body = rng.integers(0, 300, size=(batch, text), dtype=np.int32)
    ids[:, 0] = cfg.llm.bos_token_id
    ids[:, 1:1 + n_img] = special["im_patch"]
    ids[:, 1 + n_img:1 + n_img + text] = body
    labels = np.full_like(ids, -1)
    labels[:, :-1] = ids[:, 1:]
    labels[:, -1] = cfg.llm.eos_token_id
    loss_masks = np.zeros((batch, seq_len), np.float32)
    loss_masks[:, seq_len - min(188, text):] = 1.0  # the original's run had 752 loss tokens in 4 rows
    images = rng.standard_normal((batch, n_crops, n_patches, 3 * cfg.vit.patch_size ** 2), dtype=np.float32)
    image_masks = np.ones((batch, n_crops, n_patches), np.float32)
    image_input_idx = np.broadcast_to(idx, (batch,) + idx.shape).copy()
    return dict(input_ids=ids, target_tokens=labels, loss_masks=loss_masks, images=images,
                image_masks=image_masks, image_input_idx=image_input_idx)


class RandomBatches:
    """Deterministic infinite iterator of random batches; batch i depends only on (seed, i), so the
    state is just the index (checkpointable like a grain iterator)."""

    def __init__(self, cfg, batch_size=BATCH, seq_len=SEQ_LEN, seed=0, text_len=None):
        self.cfg, self.batch_size, self.seq_len, self.seed, self.text_len = cfg, batch_size, seq_len, seed, text_len
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = bench_batch(self.cfg, self.batch_size, self.seq_len, self.text_len, seed=(self.seed, self.index))
        self.index += 1
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])
