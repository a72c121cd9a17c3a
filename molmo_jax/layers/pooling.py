"""Pooling patch features by attention: windows of the patch grid (or, for Molmo2, groups of patches
named by index tables), each pooled to one vector by a multi-head attention whose query is the
window's mean (or its first member)."""
from __future__ import annotations

import jax.numpy as jnp

from molmo_jax.layers.attention import Mask, attend


def grid_windows(features, grid: tuple[int, int], window: tuple[int, int]):
    """[B, C, P, F] patch features of C crops on a `grid` (rows, cols) -> [B*C*th*tw, wh*ww, F]:
    row-major windows, members in (dy, dx) order. Odd grids are zero-padded at the bottom/right."""
    b, n, _, f = features.shape
    (gh, gw), (wh, ww) = grid, window
    x = features.reshape(b, n, gh, gw, f)
    pad_h, pad_w = (-gh) % wh, (-gw) % ww
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    th, tw = (gh + pad_h) // wh, (gw + pad_w) // ww
    x = x.reshape(b, n, th, wh, tw, ww, f).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b * n * th * tw, wh * ww, f)


def window_query(members, mean: bool = True):
    """[N, w, F] -> [N, 1, F]: the mean of each window's members, or its first member."""
    return jnp.mean(members, axis=1, keepdims=True) if mean else members[:, :1]


def attention_pool(wq, wk, wv, wo, members, query, valid=None):
    """[N, w, F] window members and their [N, 1, F] query -> [N, out]: one multi-head attention per
    window (q from the query, keys/values from the members; `valid` [N, w] masks members), output
    through wo."""
    mask = Mask(kv_valid=valid) if valid is not None else None
    return wo(attend(wq(query), wk(members), wv(members), mask))[:, 0]
