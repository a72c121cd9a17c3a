"""Molmo2 images -> crops, pooling tables and grids, equal to transformers' `Molmo2ImageProcessor`
(docs/architecture.md#molmo2-preprocessing).

One image gives
  pixel_values        float32 [1 + r*c, P, patch*patch*3]: the whole image resized (squashed, no
                      letterbox) to crop_size x crop_size, then the r x c overlapping crops of one canvas
  token_pooling       int32 [n_tokens, pool_h*pool_w]: per pooled token (low-res tokens first, then
                      high-res), the rows of the image's flattened patches it pools; -1 pads windows
  grid                (low_h, low_w, high_h, high_w): the pooled token grids of both views
Several images concatenate their pixel_values; their pooling rows are offset by the patches before them.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from molmo_jax.preprocess import blas
from molmo_jax.preprocess.image import patchify_crops, select_tiling
from molmo_jax.preprocess.image_io import ImageError, load_image
from molmo_jax.preprocess.resize import F32, resize_chw


def check_view(s) -> None:
    """The options image and video settings share: crop size, patch, pooling, normalisation. Sequences
    become tuples, so that settings hash (tables are cached per settings)."""
    for name in ("pooling", "mean", "std") + (("overlap_margins",) if hasattr(s, "overlap_margins") else ()):
        object.__setattr__(s, name, tuple(getattr(s, name)))
    if s.crop_size <= 0 or s.patch <= 0 or s.crop_size % s.patch:
        raise ValueError(f"crop_size {s.crop_size} must be a positive multiple of patch {s.patch}")
    if len(s.pooling) != 2 or min(s.pooling) < 1:
        raise ValueError(f"pooling must be two sizes >= 1, got {s.pooling}")
    if not s.rescale_factor > 0 or len(s.mean) != 3 or len(s.std) != 3 or min(s.std) <= 0:
        raise ValueError(f"need rescale_factor > 0 and three means and positive stds, got {s.rescale_factor}, "
                         f"{s.mean}, {s.std}")


@dataclasses.dataclass(frozen=True)
class Molmo2ImageSettings:
    """Molmo2ImageProcessor's options; the defaults are the released models' (SigLIP 2 at 378 px)."""
    crop_size: int = 378
    patch: int = 14
    max_crops: int = 8
    overlap_margins: tuple[int, int] = (4, 4)   # (left/top, right/bottom) in patches
    pooling: tuple[int, int] = (2, 2)           # (h, w) patches per pooled token
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        check_view(self)
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")
        if self.window_patches < 1 or min(self.overlap_margins) < 0:
            raise ValueError(f"overlap_margins {self.overlap_margins} leave no window in a crop of "
                             f"{self.crop_patches} patches")

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.patch

    @property
    def window_patches(self) -> int:
        """Patches between the overlap margins of a crop: the stride between crops."""
        return self.crop_patches - sum(self.overlap_margins)

    @property
    def margin_px(self) -> int:
        return sum(self.overlap_margins) * self.patch


# ----------------------------------------------------------------------------------------------
# Pixels

def as_rgb(image, what: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] from a uint8 [H, W, 3], [H, W] / [H, W, 1] (grey) or [H, W, 4] (RGBA) array, or from
    a path, encoded bytes or a PIL image through `load_image` (EXIF orientation applied, alpha dropped).

    An array's alpha is composited onto white in float32 as the reference does for arrays:
    trunc((rgb/255 * a/255 + (1 - a/255)) * 255.999)."""
    if not isinstance(image, np.ndarray):
        try:
            return load_image(image)
        except ImageError as e:
            raise ValueError(f"{what}: {e}") from None
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
    if not shape_ok or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"{what}: expected a uint8 array of shape [H, W, 3] ([H, W] grey, [H, W, 4] RGBA), "
                         f"got {image.dtype} {list(image.shape)}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        x = image.astype(F32) * F32(1.0 / 255)
        alpha = x[:, :, 3:]
        rgb = x[:, :, :3] * alpha + (F32(1.0) - alpha)
        return (rgb * F32(255.999)).astype(np.uint8)
    return image


def normalization(s) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 (mean, std) on the 0..255 scale: the reference folds the rescale into them."""
    scale = F32(1.0 / s.rescale_factor)
    return ((np.array(s.mean, F32) * scale)[:, None, None], (np.array(s.std, F32) * scale)[:, None, None])


def resize_normalize(x_chw: np.ndarray, size: tuple[int, int], s) -> np.ndarray:
    """float32 [3, H, W] of 0..255 values -> [3, h, w]: plain bilinear resize, rounded half to even and
    clipped back to uint8 values (as the reference), then (x - mean) / std."""
    mean, std = normalization(s)

    def finish(block, dest):
        np.rint(block, out=block)
        np.clip(block, F32(0.0), F32(255.0), out=block)
        np.subtract(block, mean, out=block)
        np.divide(block, std, out=dest)

    return resize_chw(x_chw, size[0], size[1], finish=finish, antialias=False)


def global_views(frames: np.ndarray, s) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, P, patch*patch*3]: each frame resized to the crop size."""
    n = frames.shape[0]
    cp = s.crop_patches
    out = np.empty((n, cp * cp, s.patch * s.patch * 3), F32)
    with blas.single_threaded():
        for k in range(n):
            view = resize_normalize(frames[k].transpose(2, 0, 1).astype(F32), (s.crop_size, s.crop_size), s)
            patchify_crops(view, 1, 1, (0, 0), (cp, cp), s.patch, out=out[k:k + 1])
    return out


# ----------------------------------------------------------------------------------------------
# Index tables

def pool_windows(grid: np.ndarray, pool_h: int, pool_w: int) -> tuple[np.ndarray, int, int]:
    """[h, w] patch-index grid -> ([rows*cols, pool_h*pool_w] windows in raster order, rows, cols). The grid
    is first padded with -1 to whole windows, the odd pixel of padding at the bottom/right."""
    h, w = grid.shape
    pad_h, pad_w = -h % pool_h, -w % pool_w
    grid = np.pad(grid, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)), constant_values=-1)
    rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
    windows = grid.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)
    return windows, rows, cols


def crop_geometry(height: int, width: int, s: Molmo2ImageSettings) -> tuple[int, int, int, int]:
    """(tiling_h, tiling_w, canvas_h, canvas_w): the tiling is chosen on the image minus the margins
    against windows of window_patches * patch px (docs/architecture.md#tiling), the canvas holds the windows
    plus one margin."""
    window = s.window_patches * s.patch
    th, tw = select_tiling(height - s.margin_px, width - s.margin_px, (window, window), s.max_crops)
    return th, tw, th * window + s.margin_px, tw * window + s.margin_px


@functools.lru_cache(maxsize=256)
def pooling_table(s: Molmo2ImageSettings, tiling: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(int32 [n_tokens, pool_h*pool_w], grid) for one tiling, relative to the image's first patch (cached).

    High-res: the patches of all crops, numbered crop by crop, lose their overlap margins (except on the
    canvas border) and the rest stitch into the canvas's patch grid, which is pooled; these rows come
    after the low-res view's crop_patches**2 patches."""
    th, tw = tiling
    cp = s.crop_patches
    left, right = s.overlap_margins
    idx = np.arange(th * tw * cp * cp, dtype=np.int32).reshape(th, tw, cp, cp)
    if left:
        idx[1:, :, :left, :] = -1
        idx[:, 1:, :, :left] = -1
    if right:
        idx[:-1, :, -right:, :] = -1
        idx[:, :-1, :, -right:] = -1
    kept = idx.transpose(0, 2, 1, 3).reshape(-1)
    window = s.window_patches
    canvas = kept[kept >= 0].reshape(th * window + left + right, tw * window + left + right)
    high, high_h, high_w = pool_windows(canvas, *s.pooling)
    high = np.where(high >= 0, high + cp * cp, -1)
    low, low_h, low_w = pool_windows(np.arange(cp * cp, dtype=np.int32).reshape(cp, cp), *s.pooling)
    table = np.concatenate([low, high]).astype(np.int32)
    table.setflags(write=False)
    return table, (low_h, low_w, high_h, high_w)


# ----------------------------------------------------------------------------------------------
# Images

@dataclasses.dataclass
class Molmo2ImageInputs:
    pixel_values: np.ndarray    # float32 [1 + r*c, P, patch*patch*3]
    token_pooling: np.ndarray   # int32 [n_tokens, pool_h*pool_w], relative to this image's patches
    grid: tuple[int, int, int, int]
    tiling: tuple[int, int]


def process_image(image, s: Molmo2ImageSettings, what: str = "image") -> Molmo2ImageInputs:
    """One image (uint8 array, see `as_rgb`) -> its crops, pooling table and grids."""
    rgb = as_rgb(image, what)
    h, w = rgb.shape[:2]
    th, tw, canvas_h, canvas_w = crop_geometry(h, w, s)
    cp = s.crop_patches
    window = s.window_patches * s.patch
    pixel_values = np.empty((1 + th * tw, cp * cp, s.patch * s.patch * 3), F32)
    pixel_values[:1] = global_views(rgb[None], s)
    with blas.single_threaded():  # many small products: threads only add contention (see blas.py)
        canvas = resize_normalize(rgb.transpose(2, 0, 1).astype(F32), (canvas_h, canvas_w), s)
    patchify_crops(canvas, th, tw, (window, window), (cp, cp), s.patch, out=pixel_values[1:])
    table, grid = pooling_table(s, (th, tw))
    return Molmo2ImageInputs(pixel_values=pixel_values, token_pooling=table, grid=grid, tiling=(th, tw))


def process_images(images, s: Molmo2ImageSettings) -> tuple[dict, list[Molmo2ImageInputs]]:
    """Several images -> (pixel_values, image_token_pooling, image_grids, image_num_crops) under the
    transformers names, and the per-image results."""
    if not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("images: got an empty list (pass None for no image)")
    per_image = [process_image(im, s, f"image {k + 1} of {len(images)}") for k, im in enumerate(images)]
    pooled, offset = [], 0
    for item in per_image:
        pooled.append(np.where(item.token_pooling >= 0, item.token_pooling + offset, -1).astype(np.int32))
        offset += item.pixel_values.shape[0] * item.pixel_values.shape[1]
    arrays = {
        "pixel_values": np.concatenate([item.pixel_values for item in per_image]),
        "image_token_pooling": np.concatenate(pooled),
        "image_grids": np.array([item.grid for item in per_image], np.int64),
        "image_num_crops": np.array([item.pixel_values.shape[0] for item in per_image], np.int64),
    }
    return arrays, per_image
