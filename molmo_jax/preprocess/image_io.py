"""Image loading: anything a data source hands us -> RGB uint8 [H, W, 3].

As the original: decode with PIL, apply the EXIF orientation, convert to RGB (which drops alpha
without compositing; palette, grayscale and CMYK go through PIL's conversions). One deliberate
difference: 16-bit images are scaled to 8 bits (v / 257) instead of PIL's clipping at 255, which
turns almost every 16-bit picture white.

Every failure (unreadable, truncated, zero-sized, too many pixels, wrong array type) raises
`ImageError` naming the source and the problem.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

# PIL's own decompression-bomb threshold (89.5 MP); override per call with `max_pixels`. PIL
# refuses images above twice its Image.MAX_IMAGE_PIXELS by itself; raise that too for larger limits.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageError(ValueError):
    """An image that cannot be used: names the source and what is wrong with it."""


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image file {os.fspath(source)!r}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, np.ndarray):
        return f"image array {source.dtype}{list(source.shape)}"
    if isinstance(source, Image.Image):
        return f"PIL image (mode {source.mode}, size {source.size})"
    return f"image of type {type(source).__name__}"


def _check_size(width: int, height: int, max_pixels: int | None, what: str):
    if width <= 0 or height <= 0:
        raise ImageError(f"{what}: zero-sized image ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{what}: {width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{max_pixels} pixels (possible decompression bomb)")


def _sixteen_bit_to_uint8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im)
        if im.mode == "F" or a.max(initial=0) > 255 or im.mode.startswith("I;16"):
            a = _sixteen_bit_to_uint8(np.clip(a, 0, 65535))
        else:
            a = a.astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _from_pil(im: Image.Image, max_pixels, what: str) -> np.ndarray:
    _check_size(im.width, im.height, max_pixels, what)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated/corrupt data as these
        raise ImageError(f"{what}: truncated or corrupt image data ({e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF metadata: the pixels are fine, keep them as stored
        pass
    try:
        out = _pil_to_rgb(im)
    except (OSError, ValueError) as e:
        raise ImageError(f"{what}: cannot convert mode {im.mode!r} to RGB ({e})") from None
    return np.ascontiguousarray(out)


def _from_array(a: np.ndarray, max_pixels, what: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"{what}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    _check_size(a.shape[1], a.shape[0], max_pixels, what)
    if a.dtype == np.uint16:
        a = _sixteen_bit_to_uint8(a)
    elif a.dtype != np.uint8:
        raise ImageError(f"{what}: pixel type must be uint8 (or uint16), got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def load_image(source, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 [H, W, 3] from a path, encoded bytes, a numpy array or a PIL image."""
    what = _describe(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels, what)
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels, what)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ImageError(f"{what}: no such file")
        opener = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{what}: empty")
        opener = io.BytesIO(bytes(source))
    else:
        raise ImageError(f"{what}: expected a path, bytes, a numpy array or a PIL image")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; PIL's warning at 1x its limit would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opener) as im:
                return _from_pil(im, max_pixels, what)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: too many pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{what}: not a recognised image format (corrupt or not an image)") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot be read ({e})") from None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def frame_files(folder) -> list[str]:
    """The image files of a video's frames folder, in name order; ValueError naming the folder otherwise."""
    import pathlib

    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder of frames")
    frames = sorted(str(p) for p in pathlib.Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return frames
