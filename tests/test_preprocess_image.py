"""Image path: resize vs torch, tiling, crops, masks, token layout; golden preprocess files."""
import json

import numpy as np
import pytest
import torch

from molmo_jax.config import get_config, tiny
from molmo_jax.preprocess import ImageSettings, process_image, select_tiling
from molmo_jax.preprocess.image import image_layout
from molmo_jax.preprocess.resize import resize_chw, resize_weights
from molmo_jax.weights.mappings.molmo import config_from_original

GOLDEN_NAMES = ["img_50x80", "img_336x336", "img_480x640", "img_1000x300", "img_224x1500", "img_700x700"]
# Measured maximum |ours - golden| over the `images` of all golden files is 9.5e-7; keep a margin.
IMAGES_ATOL = 2e-6


@pytest.fixture(scope="module")
def settings_7b():
    return ImageSettings.from_config(get_config("molmo_7b_d"))


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_preprocess_image_arrays(golden_dir, settings_7b, name):
    g = np.load(golden_dir / "preprocess" / f"{name}.npz")
    out = process_image(g["image"], settings_7b)
    assert out.tiling == tuple(g["tiling"])
    assert out.images.shape == g["images"].shape and out.images.dtype == np.float32
    assert np.abs(out.images - g["images"]).max() <= IMAGES_ATOL
    np.testing.assert_array_equal(out.image_masks, g["image_masks"])
    np.testing.assert_array_equal(out.tokens, g["image_token_ids"])
    np.testing.assert_array_equal(out.patch_idx, g["image_input_idx_before_offset"])


def test_golden_settings_match_config(golden_dir, settings_7b):
    st = json.load(open(golden_dir / "preprocess" / "settings.json"))["multimodal_preprocessor_settings"]
    s = settings_7b
    assert (st["max_crops"], tuple(st["overlap_margins"]), tuple(st["base_image_input_size"])) == \
        (s.max_crops, s.margins, s.crop_size)
    assert (st["image_start_token_id"], st["image_end_token_id"], st["image_patch_token_id"],
            st["image_col_token_id"]) == (s.im_start, s.im_end, s.im_patch, s.im_col)


@pytest.mark.parametrize("shape", [(480, 640, 560, 746), (480, 640, 252, 336), (50, 80, 210, 336),
                                   (1000, 300, 336, 100), (13, 7, 5, 3), (7, 9, 7, 30), (300, 300, 300, 301),
                                   (1, 1, 4, 4), (900, 20, 11, 336)])
def test_resize_matches_torch_antialiased_bilinear(shape):
    h, w, oh, ow = shape
    x = np.random.default_rng(h * w + oh).random((3, h, w), dtype=np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], (oh, ow), mode="bilinear",
                                          antialias=True, align_corners=False)[0].numpy()
    ours = resize_chw(x, oh, ow)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-6   # float32 rounding only (values in [0, 1])


def test_resize_weights_rows_sum_to_one_and_blocks_are_cached():
    from molmo_jax.preprocess.resize import _blocks

    w = resize_weights(640, 336)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    blocks = _blocks(640, 336, 16)
    assert _blocks(640, 336, 16) is blocks
    # The banded blocks hold exactly the dense matrix's non-zero band.
    rebuilt = np.zeros_like(w)
    for r0, r1, lo, hi, part, part_t in blocks:
        rebuilt[r0:r1, lo:hi] = part
        np.testing.assert_array_equal(part_t, part.T)
    np.testing.assert_array_equal(rebuilt, w)
    with pytest.raises(ValueError, match="0 pixels"):
        resize_weights(10, 0)


# (H, W) -> (rows, cols): worked examples of the original's rule (docs/architecture.md#tiling), released settings.
TILINGS = [((224, 224), (1, 1)), ((336, 336), (1, 1)), ((448, 448), (2, 2)), ((480, 640), (2, 3)),
           ((640, 480), (3, 2)), ((720, 1280), (3, 4)), ((1080, 1920), (3, 4)), ((3000, 3000), (3, 3)),
           ((560, 560), (2, 2)), ((561, 561), (3, 3)), ((100, 2000), (1, 1))]


@pytest.mark.parametrize("size,expected", TILINGS)
def test_select_tiling_spec_examples(size, expected):
    h, w = size
    assert select_tiling(h - 112, w - 112, (224, 224), 12) == expected


def test_select_tiling_36_crops_and_degenerate_sizes():
    assert select_tiling(3000 - 112, 3000 - 112, (224, 224), 36) == (6, 6)
    assert select_tiling(0, 0, (224, 224), 12) == (1, 1)        # both sides inf -> first candidate
    assert select_tiling(-50, -30, (224, 224), 12) == (1, 1)    # smaller than the margins


# tiling -> image tokens (docs/architecture.md#image-token-layout): 160 + (8r+4)(8c+5).
@pytest.mark.parametrize("tiling,n_tokens", [((1, 1), 316), ((2, 2), 580), ((2, 3), 740), ((3, 4), 1196),
                                             ((12, 1), 1460), ((6, 6), 2916)])
def test_image_token_counts(settings_7b, tiling, n_tokens):
    tokens, idx = image_layout(settings_7b, tiling)
    assert len(tokens) == n_tokens
    assert idx.shape == (1 + tiling[0] * tiling[1], 144)


def _check_layout(s, tiling):
    """Every <im_patch> token receives exactly one feature; the rest are dropped (-100)."""
    tokens, idx = image_layout(s, tiling)
    kept = idx[idx >= 0]
    assert len(np.unique(kept)) == len(kept)
    np.testing.assert_array_equal(np.sort(kept), np.flatnonzero(tokens == s.im_patch))
    assert set(np.unique(idx[idx < 0])) <= {-100}
    assert (tokens == s.im_start).sum() == 2 and (tokens == s.im_end).sum() == 2
    # The global crop maps one-to-one onto the first block in raster order.
    assert np.all(np.diff(idx[0]) > 0)


@pytest.mark.parametrize("tiling", [(1, 1), (2, 3), (3, 2), (4, 1), (3, 3), (1, 7), (6, 6)])
def test_layout_every_patch_token_gets_one_feature(settings_7b, tiling):
    _check_layout(settings_7b, tiling)


def test_layout_for_small_crop_configs(golden_dir):
    t = tiny()
    s = ImageSettings.from_config(t)
    assert s.crop_size == (112, 112) and s.margins == (2, 2) and s.tokens_per_crop == 16
    for tiling in [(1, 1), (2, 2), (1, 4), (4, 1)]:
        _check_layout(s, tiling)
    no_cols = tiny()
    no_cols.image.use_col_tokens = False
    s2 = ImageSettings.from_config(no_cols)
    tokens, _ = image_layout(s2, (2, 2))
    assert s2.im_col not in tokens
    _check_layout(s2, (2, 2))


def test_max_crops_override_36(settings_7b):
    s = ImageSettings.from_config(get_config("molmo_7b_d"), max_crops=36)
    img = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), np.uint8)
    out = process_image(img, s)
    assert out.tiling == (6, 6)
    assert out.images.shape == (37, 576, 588) and out.image_masks.shape == (37, 576)
    assert len(out.tokens) == 2916


def test_patches_are_dy_dx_rgb_ordered_crops(settings_7b):
    """A 336x336 image is not resized: crop 0 is exactly the normalised pixels, patch-ordered."""
    img = np.random.default_rng(1).integers(0, 256, (336, 336, 3), np.uint8)
    out = process_image(img, settings_7b)
    s = settings_7b
    x = (img.astype(np.float32) / np.float32(255) - np.array(s.mean, np.float32)) / np.array(s.std, np.float32)
    patches = x.reshape(24, 14, 24, 14, 3).transpose(0, 2, 1, 3, 4).reshape(576, 588)
    np.testing.assert_allclose(out.images[0], patches, atol=1e-6)


def test_letterbox_padding_and_masks(settings_7b):
    """A wide image is letterboxed: padding rows are -mean/std, masks count real pixels."""
    img = np.full((100, 400, 3), 255, np.uint8)
    out = process_image(img, settings_7b)
    s = settings_7b
    pad = (0 - np.array(s.mean, np.float32)) / np.array(s.std, np.float32)
    glob = out.images[0].reshape(24, 24, 14, 14, 3)
    np.testing.assert_allclose(glob[0, :, 0, 0], np.broadcast_to(pad, (24, 3)), atol=1e-6)   # top rows
    np.testing.assert_allclose(glob[12, 5, 0, 0], (1 - np.array(s.mean)) / np.array(s.std), atol=1e-5)
    assert out.image_masks.shape == (len(out.images), 576)
    np.testing.assert_array_equal(out.image_masks[-1], -1.0)      # legacy shift: last row -1
    assert set(np.unique(out.image_masks[:-1])) >= {0.0, 1.0}


def test_non_legacy_masks_are_aligned_with_crops():
    cfg = get_config("molmo_7b_d")
    cfg.image.legacy_mask_shift = False
    s = ImageSettings.from_config(cfg)
    img = np.full((100, 400, 3), 128, np.uint8)
    legacy = process_image(img, ImageSettings.from_config(get_config("molmo_7b_d")))
    fixed = process_image(img, s)
    np.testing.assert_array_equal(fixed.image_masks[1:], legacy.image_masks[:-1])
    # The global view of a 1:4 image is letterboxed: 336x84 real pixels, 1/4 of the patches.
    assert fixed.image_masks[0].mean() == pytest.approx(84 / 336)


def test_golden_model_configs_parse_into_settings(golden_dir):
    for name, crop, margins, max_crops in [("olmo_style", 112, (2, 2), 4), ("qwen2_style", 224, (4, 4), 6)]:
        cfg = config_from_original(json.load(open(golden_dir / "models" / name / "config.json")))
        s = ImageSettings.from_config(cfg)
        assert (s.crop_size, s.margins, s.max_crops) == ((crop, crop), margins, max_crops)


def test_bad_settings_and_inputs_raise_clear_errors():
    cfg = get_config("molmo_7b_d")
    cfg.image.overlap_margins = (3, 3)
    with pytest.raises(ValueError, match="multiples of the pooling"):
        ImageSettings.from_config(cfg)
    cfg = get_config("molmo_7b_d")
    cfg.image.crop_mode = "resize"
    with pytest.raises(ValueError, match="crop_mode"):
        ImageSettings.from_config(cfg)
    s = ImageSettings.from_config(get_config("molmo_7b_d"))
    with pytest.raises(ValueError, match="RGB uint8"):
        process_image(np.zeros((10, 10), np.uint8), s)


def test_extreme_aspect_ratio_keeps_one_pixel(settings_7b):
    out = process_image(np.zeros((1, 3000, 3), np.uint8), settings_7b)
    assert out.images.shape[1:] == (576, 588)
    assert np.all(np.isfinite(out.images))


def test_blas_single_threaded_restores_the_thread_count(monkeypatch):
    from molmo_jax.preprocess import blas

    local, get, set_ = blas._openblas()
    if get is None:
        pytest.skip("numpy is not linked against OpenBLAS here (the context is a no-op)")
    before = get()
    with blas.single_threaded():
        process_image(np.zeros((50, 60, 3), np.uint8), ImageSettings.from_config(tiny()))
    assert get() == before
    # The process-wide fallback (OpenBLAS < 0.3.27): 1 thread inside, nested blocks, restored after.
    monkeypatch.setattr(blas, "_openblas", lambda: (None, get, set_))
    set_(2)
    with blas.single_threaded():
        with blas.single_threaded():
            assert get() == 1
        assert get() == 1
    assert get() == 2
    set_(before)


def test_preprocess_imports_neither_jax_nor_torch():
    import subprocess
    import sys

    code = ("import sys, molmo_jax.preprocess, tools.preprocess; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'torch', 'flax', 'tensorflow')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
