"""Image loading: every source kind and PIL mode -> RGB uint8, and one clear error for bad images."""
import io

import numpy as np
import pytest
from PIL import Image

from molmo_jax.preprocess import ImageError, load_image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 30, 3), np.uint8)


def test_sources_path_bytes_array_pil_agree(tmp_path, rgb):
    png = _encode(Image.fromarray(rgb), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(png)
    for source in (str(path), path, png, bytearray(png), rgb, Image.fromarray(rgb)):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
        np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_like_pil(rgb):
    jpg = _encode(Image.fromarray(rgb), "JPEG", quality=95)
    out = load_image(jpg)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))


def test_grayscale_palette_rgba_cmyk(rgb):
    gray = Image.fromarray(rgb[:, :, 0])
    out = load_image(_encode(gray, "PNG"))
    np.testing.assert_array_equal(out, np.repeat(rgb[:, :, :1], 3, axis=2))

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = load_image(_encode(pal, "PNG"))
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))

    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=2)   # fully transparent
    out = load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out, rgb)                                    # alpha dropped, not composited
    np.testing.assert_array_equal(load_image(rgba), rgb)

    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = load_image(_encode(cmyk, "TIFF"))
    np.testing.assert_array_equal(out, np.asarray(cmyk.convert("RGB")))


def test_sixteen_bit_images_are_scaled_not_clipped():
    a = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100)
    out = load_image(_encode(Image.fromarray(a), "PNG"))
    assert out.shape == (20, 30, 3)
    expected = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    assert len(np.unique(out)) > 100          # PIL's own conversion would clip almost all to 255
    np.testing.assert_array_equal(load_image(a)[:, :, 1], expected)


def test_exif_orientation_is_applied():
    yy, xx = np.mgrid[0:20, 0:30]
    smooth = np.stack([yy * 12, xx * 8, (yy + xx) * 5], axis=2).astype(np.uint8)  # JPEG-friendly
    im = Image.fromarray(smooth)
    exif = Image.Exif()
    exif[0x0112] = 6                        # "rotate 90 CW to display"
    out = load_image(_encode(im, "JPEG", exif=exif.tobytes(), quality=100))
    assert out.shape == (30, 20, 3)
    upright = load_image(_encode(im, "JPEG", quality=100))
    np.testing.assert_allclose(out.astype(int), np.rot90(upright, k=-1).astype(int), atol=3)


def test_array_layouts():
    g = np.zeros((5, 6), np.uint8)
    assert load_image(g).shape == (5, 6, 3)
    assert load_image(g[:, :, None]).shape == (5, 6, 3)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((5, 6, 3), np.float32))
    with pytest.raises(ImageError, match=r"\[H, W"):
        load_image(np.zeros((5, 6, 2), np.uint8))


def test_truncated_file_raises_image_error(tmp_path, rgb):
    big = np.random.default_rng(1).integers(0, 256, (200, 200, 3), np.uint8)
    data = _encode(Image.fromarray(big), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png.*truncated"):
        load_image(str(path))
    jpg = _encode(Image.fromarray(big), "JPEG")
    with pytest.raises(ImageError, match="truncated|cannot be read"):
        load_image(jpg[: len(jpg) // 3])


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="bad.jpg.*not a recognised image"):
        load_image(bad)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12345)


def test_zero_sized_images():
    with pytest.raises(ImageError, match="zero-sized"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="zero-sized"):
        load_image(Image.new("RGB", (0, 4)))


def test_pixel_limit_is_configurable(rgb):
    png = _encode(Image.fromarray(rgb), "PNG")
    with pytest.raises(ImageError, match="600 pixels exceeds the limit of 599"):
        load_image(png, max_pixels=599)
    assert load_image(png, max_pixels=600).shape == (20, 30, 3)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(rgb, max_pixels=10)
    assert load_image(png, max_pixels=None).shape == (20, 30, 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bombs_are_rejected_from_the_header():
    # 100 MP: above our default limit (89.5 MP), checked before any pixel is decoded.
    with pytest.raises(ImageError, match="10000x10000 = 100000000 pixels exceeds the limit"):
        load_image(_png_header_only(10000, 10000))
    # 400 MP: PIL's own guard fires first; still the same error type.
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(_png_header_only(20000, 20000))
    # Within the limit, the missing pixel data is reported as a truncated/corrupt image.
    with pytest.raises(ImageError, match="truncated or corrupt|cannot be read"):
        load_image(_png_header_only(100, 100))
