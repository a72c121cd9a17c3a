"""Image preprocessing throughput on one CPU core, run by hand:

    .venv/bin/python -m bench.bench_preprocess [--size 640x480] [--images 24] [--rounds 15]

Every path starts from JPEG bytes and ends with the model arrays of the released settings
(Molmo-7B-D: 12 crops max, 336 px crops, margins 4): decode -> RGB -> tiling -> two antialiased
resizes -> letterbox + CLIP normalisation -> overlapping crops -> patches, masks, token layout.
  numpy   molmo_jax.preprocess as shipped (banded-matmul resize)
  torch   the same path with each resize done by torch's
          F.interpolate(mode="bilinear", antialias=True) instead (what the original calls)
  numpy_full_cold_weight_cache: the resize weights rebuilt for every image (all sizes new)
  numpy_full_training_example adds the text side (two packed conversations, tiny test tokenizer)
Both run in this process, on one thread (BLAS and torch pinned to one thread), on the same
synthetic photo-like JPEGs; per-image time = median over rounds of (round time / images), the
variants interleaved within each round.
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy/torch load their thread pools

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from molmo_jax.config import get_config  # noqa: E402
from molmo_jax.preprocess import (ImageSettings, MolmoTokenizer, Preprocessor, load_image,  # noqa: E402
                                  process_image)
from molmo_jax.preprocess import image as image_mod  # noqa: E402
from molmo_jax.preprocess import resize as resize_mod  # noqa: E402


def synthetic_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Photo-like pictures (smooth gradients, shapes, texture) so JPEG decoding costs what it costs
    on real images (pure noise or flat colour would make the decoder unrealistically slow/fast)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        base = np.stack([np.sin(xx / rng.uniform(20, 200) + rng.uniform(0, 6)) * 80 + 128,
                         np.cos(yy / rng.uniform(20, 200)) * 80 + 128,
                         (xx + yy) / (width + height) * 255], axis=2)
        for _ in range(8):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, 120)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            base[disc] = rng.uniform(0, 255, 3)
        base += rng.normal(0, 6, base.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def torch_resize_chw(x, out_h, out_w, out=None, finish=None):
    """Drop-in for molmo_jax.preprocess.resize.resize_chw done by torch (the original's call);
    the clipping/normalisation `finish` then runs once on the whole resized image."""
    import torch

    y = torch.nn.functional.interpolate(torch.from_numpy(x)[None], (out_h, out_w), mode="bilinear",
                                        antialias=True, align_corners=False)[0].numpy()
    if out is None:
        out = np.empty_like(y)
    if finish is None:
        out[...] = y
    else:
        finish(y, out)
    return out


def interleaved(variants: dict, rounds: int) -> dict:
    """Per-image seconds of each (fn, items) variant. The variants alternate inside every round,
    so load from other processes on a shared machine hits all of them alike; the median over
    rounds is reported, with the min (the least disturbed round)."""
    for fn, items in variants.values():
        fn(items[0])  # warm caches (weight matrices, layouts, torch kernels)
    per = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, items) in variants.items():
            t = time.perf_counter()
            for it in items:
                fn(it)
            per[name].append((time.perf_counter() - t) / len(items))
    out = {}
    for name, ts in per.items():
        med = statistics.median(ts)
        out[name] = {"ms_per_image": round(med * 1e3, 3), "images_per_s_per_core": round(1.0 / med, 1),
                     "min_ms": round(min(ts) * 1e3, 3), "max_ms": round(max(ts) * 1e3, 3)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--max-crops", type=int, default=None)
    args = p.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    import torch

    torch.set_num_threads(1)
    settings = ImageSettings.from_config(get_config("molmo_7b_d"), max_crops=args.max_crops)
    jpegs = synthetic_jpegs(args.images, width, height)
    decoded = [load_image(b) for b in jpegs]
    numpy_resize = image_mod.resize_chw

    def full(b):
        return process_image(load_image(b), settings)

    def pixels_only(a):
        return process_image(a, settings)

    def full_cold(b):  # worst case for the weight cache: every image has a new size
        resize_mod._blocks.cache_clear()
        return full(b)

    def with_torch_resize(fn):
        def run(item):
            image_mod.resize_chw = torch_resize_chw
            try:
                return fn(item)
            finally:
                image_mod.resize_chw = numpy_resize
        return run

    tok_dir = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "golden", "tiny-qwen2-style-tokenizer")
    cfg = get_config("molmo_7b_d")
    pre = Preprocessor(cfg, MolmoTokenizer(tok_dir, cfg.llm.vocab_size), max_crops=args.max_crops)
    convs = [{"style": "vqa2", "question": "What color is the large disc on the left?", "answer": "red"},
             {"style": "long_caption", "text": "A photo-like synthetic picture with colourful discs. " * 12}]
    rng = np.random.default_rng(0)

    def example(b):  # + text: formatting, tokenisation, packing of two conversations
        return pre({"image": b, "message_list": convs}, rng)

    # The two resizes alone (high-res view and global view sizes of this image).
    floats = [image_mod.to_float_chw(a) for a in decoded]
    rows, cols = process_image(decoded[0], settings).tiling
    win = [p * settings.patch for p in settings.window_patches]
    hr_size = (rows * win[0] + settings.margin_px, cols * win[1] + settings.margin_px)
    sizes = [image_mod.letterbox_geometry(height, width, t)[:2] for t in (hr_size, settings.crop_size)]

    def resizes(resize):
        return lambda x: [resize(x, h, w) for h, w in sizes]

    ours = process_image(decoded[0], settings)
    theirs = with_torch_resize(pixels_only)(decoded[0])
    results = interleaved({
        "decode_only": (load_image, jpegs),
        "numpy_full": (full, jpegs),
        "numpy_full_cold_weight_cache": (full_cold, jpegs),
        "numpy_full_training_example": (example, jpegs),
        "torch_resize_full": (with_torch_resize(full), jpegs),
        "numpy_from_pixels": (pixels_only, decoded),
        "torch_resize_from_pixels": (with_torch_resize(pixels_only), decoded),
        "numpy_two_resizes_only": (resizes(numpy_resize), floats),
        "torch_two_resizes_only": (resizes(torch_resize_chw), floats),
    }, args.rounds)
    speedup = results["torch_resize_full"]["ms_per_image"] / results["numpy_full"]["ms_per_image"]
    print(json.dumps({
        "bench": "preprocess_image", "size": f"{width}x{height}", "tiling": list(ours.tiling),
        "resized_sizes_hw": sizes,
        "crops": int(ours.images.shape[0]), "images": args.images, "rounds": args.rounds,
        "cpu": platform.processor() or platform.machine(), "threads": 1,
        "max_abs_diff_numpy_vs_torch_images": float(np.abs(ours.images - theirs.images).max()),
        **results, "numpy_speedup_over_torch_full": round(speedup, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
