"""Image -> crops, patch masks, image tokens and feature positions (crop mode overlap-and-resize-c2).

See docs/architecture.md#2-preprocessing. One image gives
  images           [1 + r*c, P, patch*patch*3]  global letterboxed view first, then the r x c
                                                 overlapping high-res crops in reading order
  image_masks      [1 + r*c, P]   per-patch fraction of real (non-letterbox) pixels; with the
                                   legacy shift (released weights) row k is high-res crop k's mask
                                   and the last row is -1
  tokens           the image-token block: global block then high-res block
  patch_idx        [1 + r*c, tokens_per_crop] position inside `tokens` of each pooled feature,
                   -100 for features of the overlap margins that are dropped
All of it is plain numpy (grain workers and inference servers run it).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from molmo_jax import config as config_lib
from molmo_jax.preprocess import blas
from molmo_jax.preprocess.resize import F32, resize_chw

DROPPED = -100  # image_input_idx of a pooled feature cut away by the overlap margins
SUPPORTED_CROP_MODES = ("overlap-and-resize-c2", "overlap-and-resize")


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    crop_size: tuple[int, int]          # (h, w) of one crop in pixels (the ViT input size)
    patch: int
    pool: tuple[int, int]               # pooling window (h, w) in patches
    max_crops: int
    margins: tuple[int, int]            # overlap margins (left/top, right/bottom) in patches
    use_col_tokens: bool
    pad_value: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    legacy_mask_shift: bool
    im_start: int
    im_end: int
    im_patch: int
    im_col: int

    @classmethod
    def from_config(cls, cfg, max_crops: int | None = None) -> "ImageSettings":
        im = cfg.image
        if im.crop_mode not in SUPPORTED_CROP_MODES:
            raise ValueError(f"cfg.image.crop_mode={im.crop_mode!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_CROP_MODES)})")
        ids = config_lib.image_token_ids(cfg)
        s = cls(crop_size=tuple(int(v) for v in cfg.vit.image_size), patch=int(cfg.vit.patch_size),
                pool=(int(cfg.connector.pool_h), int(cfg.connector.pool_w)),
                max_crops=int(max_crops if max_crops is not None else im.max_crops),
                margins=tuple(int(v) for v in im.overlap_margins), use_col_tokens=bool(im.use_col_tokens),
                pad_value=float(im.pad_value), mean=tuple(float(v) for v in im.mean),
                std=tuple(float(v) for v in im.std), legacy_mask_shift=bool(im.legacy_mask_shift),
                im_start=ids["im_start"], im_end=ids["im_end"], im_patch=ids["im_patch"], im_col=ids["im_col"])
        s.validate()
        return s

    # -- derived sizes ----------------------------------------------------------------------------
    @property
    def crop_patches(self) -> tuple[int, int]:
        return self.crop_size[0] // self.patch, self.crop_size[1] // self.patch

    @property
    def window_patches(self) -> tuple[int, int]:
        """Patches of a crop that are not overlap margin (the stride between crops)."""
        m = self.margins[0] + self.margins[1]
        return self.crop_patches[0] - m, self.crop_patches[1] - m

    @property
    def margin_px(self) -> int:
        return (self.margins[0] + self.margins[1]) * self.patch

    @property
    def tokens_side(self) -> tuple[int, int]:
        """Pooled tokens per crop side (rounded up, as the original)."""
        (ph, pw), (kh, kw) = self.crop_patches, self.pool
        return -(-ph // kh), -(-pw // kw)

    @property
    def tokens_per_crop(self) -> int:
        th, tw = self.tokens_side
        return th * tw

    def validate(self):
        ch, cw = self.crop_size
        if ch % self.patch or cw % self.patch:
            raise ValueError(f"crop size {self.crop_size} is not a multiple of the patch size {self.patch}")
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")
        if min(self.window_patches) < 1:
            raise ValueError(f"overlap margins {self.margins} leave no window in a crop of "
                             f"{self.crop_patches} patches")
        for k in self.pool:
            if self.margins[0] % k or self.margins[1] % k:
                # The original requires margins that are whole pooling windows (2x2 pooling: even).
                raise ValueError(f"overlap margins {self.margins} must be multiples of the pooling size {self.pool}")


# ----------------------------------------------------------------------------------------------
# Tiling

@functools.lru_cache(maxsize=64)
def _candidate_tilings(max_crops: int) -> np.ndarray:
    pairs = [(r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops]
    pairs.sort(key=lambda rc: (rc[0] * rc[1], rc[0]))
    return np.array(pairs, np.int32)


def select_tiling(h: int, w: int, window: tuple[int, int], max_crops: int) -> tuple[int, int]:
    """(rows, cols) of high-res crops for an image of h x w pixels *minus the margins* (docs/architecture.md#tiling):
    the least upscaling if some tiling needs none, else the least downscaling; float32 scales,
    ties to the earlier candidate in (r*c, r) order."""
    cand = _candidate_tilings(max_crops)
    res = (cand * np.array(window, np.int32)).astype(F32)
    with np.errstate(divide="ignore"):
        scales = (res / np.array([h, w], F32)).min(axis=1)  # zero side -> inf, negative -> negative
    if np.all(scales < 1):
        ix = int(np.argmax(scales))
    else:
        ix = int(np.argmin(np.where(scales < 1, F32(10e9), scales)))
    return int(cand[ix, 0]), int(cand[ix, 1])


# ----------------------------------------------------------------------------------------------
# Pixels

def to_float_chw(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1] (division by 255, as torch's convert)."""
    out = np.empty((3,) + image.shape[:2], F32)
    np.divide(image.transpose(2, 0, 1), F32(255.0), out=out, dtype=F32)
    return out


def letterbox_geometry(h: int, w: int, target: tuple[int, int]):
    """(scaled_h, scaled_w, top, left) of the aspect-preserving resize into `target` (docs/architecture.md#letterbox)."""
    th, tw = target
    scale = min(F32(th) / F32(h), F32(tw) / F32(w))
    # float32 product then truncation; at least 1 px (the original would fail on a 0-px side).
    sh = max(int(F32(h) * scale), 1)
    sw = max(int(F32(w) * scale), 1)
    return sh, sw, (th - sh) // 2, (tw - sw) // 2


def resize_pad_normalize(x_chw: np.ndarray, target: tuple[int, int], s: ImageSettings):
    """Letterboxed, CLIP-normalised [3, th, tw] canvas and its (sh, sw, top, left) geometry:
    resize, clip to [0, 1], pad with pad_value, then (x - mean) / std, all in float32 (docs/architecture.md#letterbox)."""
    _, h, w = x_chw.shape
    th, tw = target
    sh, sw, top, left = letterbox_geometry(h, w, target)
    mean = np.array(s.mean, F32)[:, None, None]
    std = np.array(s.std, F32)[:, None, None]
    canvas = np.empty((3, th, tw), F32)
    pad = (F32(s.pad_value) - mean) / std   # padding is normalised like the pixels
    for region in (canvas[:, :top], canvas[:, top + sh:], canvas[:, top:top + sh, :left],
                   canvas[:, top:top + sh, left + sw:]):
        region[...] = pad

    def finish(block, dest):  # clip + normalise each block of rows while it is in cache
        np.clip(block, F32(0.0), F32(1.0), out=block)
        np.subtract(block, mean, out=block)
        np.divide(block, std, out=dest)

    resize_chw(x_chw, sh, sw, out=canvas[:, top:top + sh, left:left + sw], finish=finish)
    return canvas, (sh, sw, top, left)


def patchify_crops(canvas: np.ndarray, rows: int, cols: int, stride: tuple[int, int],
                   crop_patches: tuple[int, int], p: int, out: np.ndarray):
    """Write the patch vectors of the rows x cols crops (crop_patches patches of p x p pixels each)
    of a [3, H, W] canvas, taken with the given pixel stride, into out [rows*cols, P, p*p*3]:
    (dy, dx, rgb) order, patches row-major. One strided view per channel and one copy (measured
    faster than going channel-last first)."""
    ph, pw = crop_patches
    dst = out.reshape(rows, cols, ph, pw, p, p, 3)
    for ch in range(3):
        plane = canvas[ch]
        by, bx = plane.strides
        view = np.lib.stride_tricks.as_strided(
            plane, shape=(rows, cols, ph, pw, p, p),
            strides=(stride[0] * by, stride[1] * bx, p * by, p * bx, by, bx), writeable=False)
        dst[..., ch] = view


def _overlap(starts: np.ndarray, length: int, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.minimum(starts + length, hi) - np.maximum(starts, lo), 0, None)


def patch_masks(geometry, rows: int, cols: int, stride: tuple[int, int], s: ImageSettings) -> np.ndarray:
    """[rows*cols, P] fraction of real pixels per patch (the mean of the patch's boolean mask)."""
    sh, sw, top, left = geometry
    ph, pw = s.crop_patches
    p = s.patch
    ys = (np.arange(rows)[:, None] * stride[0] + np.arange(ph)[None, :] * p)   # [rows, ph] patch tops
    xs = (np.arange(cols)[:, None] * stride[1] + np.arange(pw)[None, :] * p)
    ny = _overlap(ys, p, top, top + sh)
    nx = _overlap(xs, p, left, left + sw)
    count = ny[:, None, :, None] * nx[None, :, None, :]                       # [rows, cols, ph, pw]
    frac = count.astype(F32) / F32(p * p)
    return frac.reshape(rows * cols, ph * pw)


# ----------------------------------------------------------------------------------------------
# Tokens

def _pooled_extent(i: int, n: int, window: int, margins: tuple[int, int], pool: int):
    """(first kept pooled row/col inside crop i of n, number kept) along one axis (docs/architecture.md#pooled-tokens)."""
    lm, rm = margins
    size = window + (lm if i == 0 else 0) + (rm if i == n - 1 else 0)
    start = 0 if i == 0 else lm // pool
    return start, -(-size // pool)


@functools.lru_cache(maxsize=512)
def image_layout(s: ImageSettings, tiling: tuple[int, int]):
    """(tokens int32 [n], patch_idx int32 [1 + r*c, tokens_per_crop]) for one tiling (cached).

    Global block: <im_start>, th rows of (tw <im_patch> [+ <im_col>]), <im_end>; the high-res
    block likewise over the stitched grid of kept pooled tokens. patch_idx is relative to the
    start of `tokens`; dropped features get -100.
    """
    rows, cols = tiling
    th, tw = s.tokens_side
    col = 1 if s.use_col_tokens else 0

    def block(n_rows, n_cols):
        row = [s.im_patch] * n_cols + [s.im_col] * col
        return [s.im_start] + row * n_rows + [s.im_end]

    glob = block(th, tw)
    g_idx = 1 + np.arange(th)[:, None] * (tw + col) + np.arange(tw)[None, :]

    ext_y = [_pooled_extent(i, rows, s.window_patches[0], s.margins, s.pool[0]) for i in range(rows)]
    ext_x = [_pooled_extent(j, cols, s.window_patches[1], s.margins, s.pool[1]) for j in range(cols)]
    big_h = sum(n for _, n in ext_y)
    big_w = sum(n for _, n in ext_x)
    # The stitched grid must equal the pooled grid of the whole resized image.
    full_h = rows * s.window_patches[0] + sum(s.margins)
    full_w = cols * s.window_patches[1] + sum(s.margins)
    if (big_h, big_w) != (-(-full_h // s.pool[0]), -(-full_w // s.pool[1])):
        raise ValueError(f"crop size {s.crop_size}, margins {s.margins} and pooling {s.pool} do not tile evenly")
    hr_start = len(glob)
    hr = block(big_h, big_w)

    idx = np.full((1 + rows * cols, th, tw), DROPPED, np.int64)
    idx[0] = g_idx
    row_off = np.cumsum([0] + [n for _, n in ext_y])
    col_off = np.cumsum([0] + [n for _, n in ext_x])
    for i, (y0, hp) in enumerate(ext_y):
        for j, (x0, wp) in enumerate(ext_x):
            big_r = row_off[i] + np.arange(hp)[:, None]
            big_c = col_off[j] + np.arange(wp)[None, :]
            idx[1 + i * cols + j, y0:y0 + hp, x0:x0 + wp] = hr_start + 1 + big_r * (big_w + col) + big_c
    tokens = np.array(glob + hr, np.int32)
    patch_idx = idx.reshape(1 + rows * cols, th * tw).astype(np.int32)
    tokens.setflags(write=False)
    patch_idx.setflags(write=False)
    return tokens, patch_idx


# ----------------------------------------------------------------------------------------------
# The whole image path

@dataclasses.dataclass
class ImageInputs:
    images: np.ndarray        # float32 [C, P, patch*patch*3]
    image_masks: np.ndarray   # float32 [C, P]
    tokens: np.ndarray        # int32 [n] image-token block
    patch_idx: np.ndarray     # int32 [C, tokens_per_crop], relative to the block start, -100 dropped
    tiling: tuple[int, int]


def process_image(image: np.ndarray, s: ImageSettings) -> ImageInputs:
    """RGB uint8 [H, W, 3] -> crops, masks, tokens and feature positions (docs/architecture.md#2-preprocessing)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"process_image expects RGB uint8 [H, W, 3], got {image.dtype} {image.shape} "
                         "(use molmo_jax.preprocess.load_image)")
    h, w = image.shape[:2]
    wh, ww = s.window_patches
    win = (wh * s.patch, ww * s.patch)
    tiling = select_tiling(h - s.margin_px, w - s.margin_px, win, s.max_crops)
    rows, cols = tiling
    x = to_float_chw(image)

    hr_size = (rows * win[0] + s.margin_px, cols * win[1] + s.margin_px)
    with blas.single_threaded():  # many small matmuls: threads only add contention (see blas.py)
        hr_canvas, hr_geom = resize_pad_normalize(x, hr_size, s)
        g_canvas, g_geom = resize_pad_normalize(x, s.crop_size, s)

    n = rows * cols
    n_patches = s.crop_patches[0] * s.crop_patches[1]
    images = np.empty((1 + n, n_patches, s.patch * s.patch * 3), F32)
    patchify_crops(g_canvas, 1, 1, (0, 0), s.crop_patches, s.patch, out=images[:1])
    patchify_crops(hr_canvas, rows, cols, win, s.crop_patches, s.patch, out=images[1:])

    hr_masks = patch_masks(hr_geom, rows, cols, win, s)
    if s.legacy_mask_shift:
        # The released weights were trained with this off-by-one (docs/architecture.md#image-masks): keep it.
        extra = np.full((1, n_patches), -1.0, F32)
        image_masks = np.concatenate([hr_masks, extra], axis=0)
    else:
        image_masks = np.concatenate([patch_masks(g_geom, 1, 1, (0, 0), s), hr_masks], axis=0)

    tokens, patch_idx = image_layout(s, tiling)
    return ImageInputs(images=images, image_masks=image_masks, tokens=tokens, patch_idx=patch_idx,
                       tiling=tiling)
