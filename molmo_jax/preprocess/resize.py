"""Bilinear resize with the semantics of torch's `F.interpolate(mode="bilinear", align_corners=False)`,
antialiased (Molmo) or not (Molmo2), in plain numpy.

The original resizes every view with that torch call, so the pixel values the released weights saw
depend on its exact filter. The resize is separable: for each axis a [out, in] weight matrix is built
once per (in_size, out_size) (cached), following torch's float32 arithmetic step by step (scale,
support, filter centres, per-row normalisation), and applied as matrix products. The matrices are
banded (each output pixel reads at most 2 * support + 1 inputs), so instead of one dense product
per axis we multiply small blocks of output rows by the window of inputs they read: a handful of
BLAS calls, about as many multiply-adds as the taps themselves, and no Python loop over pixels.

Like torch, the width axis is resized first, then the height axis (this order reproduces torch's
rounding to about one float32 ulp).

Without antialiasing torch runs another kernel: every output reads two inputs per axis, and its
float32 arithmetic (compiled with fused multiply-adds on x86-64 with AVX2 and newer, the kernel that
runs with more than one torch thread) is reproduced exactly, so results are bit-identical; Molmo2 rounds
the resized pixels to uint8, where a single ulp could flip a value.
"""
from __future__ import annotations

import functools
import math

import numpy as np

F32 = np.float32
# Outputs per block: small blocks keep the input window (and so the wasted zero taps) small; a
# few hundred BLAS calls per image is still far cheaper than dense products. Tuned on 640x480 and
# 1280x960 images at the released sizes (16 / 8 were fastest or within 5% in every case).
BLOCK_COLS = 16   # width pass: [C*H, window] @ [window, BLOCK_COLS]
BLOCK_ROWS = 8    # height pass: [BLOCK_ROWS, window] @ [C, window, W']


def _torch_aa_bilinear_taps(in_size: int, out_size: int):
    """Per output index: first input index, number of taps and the normalised float32 weights,
    mirroring torch's CPU `_compute_indices_min_size_weights_aa` for float32 inputs (mixed
    float/double promotions included)."""
    scale = F32(in_size) / F32(out_size)
    upsampling = scale < 1.0
    support = F32(1.0) if upsampling else scale        # bilinear: interp_size / 2 = 1, times scale
    invscale = 1.0 if upsampling else float(F32(1.0 / float(scale)))
    max_taps = int(math.ceil(float(support))) * 2 + 1
    i = np.arange(out_size, dtype=np.float64)
    center = (float(scale) * (i + 0.5)).astype(F32)
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xmax = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    n_taps = np.clip(xmax - xmin, 0, max_taps)
    j = np.arange(max_taps)
    # (j + xmin - center) in float32, then + 0.5 and * invscale in double, cast back to float32.
    arg = ((xmin[:, None] + j[None, :]).astype(F32) - center[:, None]).astype(F32)
    arg = ((arg.astype(np.float64) + 0.5) * invscale).astype(F32)
    absarg = np.abs(arg)
    w = np.where(absarg < 1.0, F32(1.0) - absarg, F32(0.0)).astype(F32)
    w = np.where(j[None, :] < n_taps[:, None], w, F32(0.0))
    total = np.zeros(out_size, F32)
    for k in range(max_taps):  # sequential float32 sum, as torch does
        total = (total + w[:, k]).astype(F32)
    safe_total = np.where(total == 0, F32(1.0), total)
    w = np.where(total[:, None] != 0, w / safe_total[:, None], w).astype(F32)
    return xmin, n_taps, w


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """Dense [out_size, in_size] float32 weight matrix of one axis (for inspection and tests; the
    resize itself uses the cached banded blocks)."""
    _check_sizes(in_size, out_size)
    xmin, n_taps, w = _torch_aa_bilinear_taps(in_size, out_size)
    mat = np.zeros((out_size, in_size), F32)
    rows = np.arange(out_size)
    for k in range(w.shape[1]):
        use = k < n_taps
        mat[rows[use], xmin[use] + k] = w[use, k]
    return mat


def _check_sizes(in_size: int, out_size: int):
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"cannot resize an axis of {in_size} pixels to {out_size} pixels")


# Images come in many sizes, so the cache is bounded; an entry is ~(out_size x window) floats,
# not a dense [out, in] matrix, and rebuilding one takes a fraction of a millisecond.
@functools.lru_cache(maxsize=128)
def _blocks(in_size: int, out_size: int, block: int):
    """Banded weights of one axis, per block of `block` outputs:
    ((out_start, out_stop, in_start, in_stop, weights [outs, window], its transpose), ...)."""
    _check_sizes(in_size, out_size)
    xmin, n_taps, w = _torch_aa_bilinear_taps(in_size, out_size)
    k = w.shape[1]
    used = (np.arange(k)[None, :] < n_taps[:, None]) & (w != 0)
    any_used = used.any(axis=1)
    # Per output: the input columns it reads, [lo_r, hi_r); per block: the union (window).
    lo_r = np.where(any_used, xmin + used.argmax(axis=1), in_size)
    hi_r = np.where(any_used, xmin + k - used[:, ::-1].argmax(axis=1), 0)
    starts = np.arange(0, out_size, block)
    lo_b = np.minimum.reduceat(lo_r, starts)
    hi_b = np.maximum.reduceat(hi_r, starts)
    empty = hi_b <= lo_b                     # a block of all-zero outputs: any 1-column window
    lo_b, hi_b = np.where(empty, 0, lo_b), np.where(empty, 1, hi_b)
    big = np.zeros((len(starts), block, int((hi_b - lo_b).max())), F32)
    rr, kk = np.nonzero(used)
    b = rr // block
    big[b, rr % block, xmin[rr] + kk - lo_b[b]] = w[rr, kk]
    big_t = np.ascontiguousarray(big.transpose(0, 2, 1))
    big.setflags(write=False)
    big_t.setflags(write=False)
    out = []
    for i, r0 in enumerate(starts.tolist()):
        r1 = min(r0 + block, out_size)
        lo, hi = int(lo_b[i]), int(hi_b[i])
        out.append((r0, r1, lo, hi, big[i, :r1 - r0, :hi - lo], big_t[i, :hi - lo, :r1 - r0]))
    return tuple(out)


def _copy(block, dest):
    dest[...] = block


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once, as a fused multiply-add (the float32 product is exact in float64)."""
    return (a.astype(np.float64) * b + c).astype(F32)


def _bilinear_taps(in_size: int, out_size: int):
    """Per output index: the two input indices and their float32 weights, as torch's CPU
    `compute_indices_weights_linear` (align_corners=False) computes them, source index by FMA."""
    scale = F32(in_size) / F32(out_size)
    src = _fma(np.full(out_size, scale, F32), np.arange(out_size, dtype=F32) + F32(0.5), np.float64(-0.5))
    src = np.maximum(src, F32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(F32), F32(0.0), F32(1.0)).astype(F32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, (F32(1.0) - lam1).astype(F32), lam1


def _resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Torch's generic bilinear kernel: per output, fma(fma(x00, w0, x01*w1), h0, fma(x10, w0, x11*w1)*h1).
    The inner (width) value of an output depends only on its input row, so it is computed once per input row."""
    h0, h1, a0, a1 = _bilinear_taps(x.shape[1], out_h)
    w0, w1, b0, b1 = _bilinear_taps(x.shape[2], out_w)
    rows = _fma(x[:, :, w0], b0, x[:, :, w1] * b1)
    return _fma(rows[:, h0], a0[:, None], rows[:, h1] * a1[:, None])


def resize_chw(x: np.ndarray, out_h: int, out_w: int, out: np.ndarray | None = None, finish=None,
               antialias: bool = True) -> np.ndarray:
    """Resize a float32 [C, H, W] array to [C, out_h, out_w], written into `out` if given (which
    may be a view into a larger canvas).

    `finish(block, dest)` writes each finished block of output rows into its destination view;
    it gets the block while it is hot in cache and contiguous (elementwise numpy ops on strided
    views are ~3x slower), so clipping and normalisation cost little there. Default: a copy.
    `antialias=False` gives torch's plain bilinear kernel (finished as one block).
    """
    if x.dtype != F32 or x.ndim != 3:
        raise ValueError(f"resize_chw expects a float32 [C, H, W] array, got {x.dtype} {x.shape}")
    c, h, w = x.shape
    if out is None:
        out = np.empty((c, out_h, out_w), F32)
    finish = finish or _copy
    if not antialias:
        _check_sizes(h, out_h)
        _check_sizes(w, out_w)
        finish(_resize_bilinear(x, out_h, out_w), out)
        return out
    # Width pass: rows of all channels at once, [C*H, W] @ [W_window, block].
    if w != out_w:
        flat = np.ascontiguousarray(x).reshape(c * h, w)
        tmp = np.empty((c * h, out_w), F32)
        for r0, r1, lo, hi, _, part_t in _blocks(w, out_w, BLOCK_COLS):
            np.matmul(flat[:, lo:hi], part_t, out=tmp[:, r0:r1])
        x = tmp.reshape(c, h, out_w)
    elif h == out_h:
        x = x.copy()  # no resize at all; `finish` may work in place, never on the caller's array
    if h == out_h:
        finish(x, out)
        return out
    # Height pass: [block, H_window] @ [C, H_window, W'] per block of output rows.
    buf = np.empty((c, BLOCK_ROWS, out_w), F32)
    for r0, r1, lo, hi, part, _ in _blocks(h, out_h, BLOCK_ROWS):
        block = buf[:, :r1 - r0]
        np.matmul(part, x[:, lo:hi], out=block)
        finish(block, out[:, r0:r1])
    return out
