"""Examples per second of the full training loader at the released settings, with 0, 1, 2 workers.

    .venv/bin/python -m bench.bench_loader [--images 48] [--batch 8] [--batches 10] [--workers 0,1,2]

What is timed: `input_pipeline.make_train_iterator` for Molmo-7B-D stage 1 (`pixmo_cap_with_transcripts`:
caption + one transcript packed per image, stage-1 formatting, sequence length 2304, up to 12 crops),
over a PixMo-Cap copy built here from photo-like 640x480 JPEGs: record read, JPEG decode, crops and
patches, formatting, tokenisation, packing, collation to the fixed batch shape. The first batch of each
setting (process start-up) is not timed. The tokenizer is the bundled tiny byte-level BPE padded to
Qwen2's vocabulary (the real one is not on this machine), which yields more, not fewer, tokens.

It also prints what one v5p host (4 chips) consumes at a given MFU, from the model FLOPs of
`molmo_jax.analysis.flops`, and the worker processes (cores) that takes at the measured per-worker rate.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

WORDS = ("the red bicycle leans against an old brick wall beside a window with green shutters while "
         "a cat sleeps on the sill and two people talk near a lamp post in soft evening light").split()


def photo_jpeg(rng: np.random.Generator, width=640, height=480) -> bytes:
    """A smooth photo-like picture (gradient, blobs, mild noise): JPEG sizes like real photos."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 200, 3)
    image = base + 40 * np.stack([np.sin(xs / rng.uniform(40, 120)), np.cos(ys / rng.uniform(40, 120)),
                                  np.sin((xs + ys) / rng.uniform(60, 160))], -1)
    picture = Image.fromarray(np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(12):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 90)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def text(rng: np.random.Generator, n_chars: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append(WORDS[rng.integers(len(WORDS))])
    return " ".join(words).capitalize() + "."


def build_pixmo_cap(root: str, n_images: int) -> str:
    """A PixMo-Cap copy (Hub parquet + images named by sha256(url)) built with the pixmo_cap builder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from input_pipeline.builders import hub
    from input_pipeline.builders.pixmo import PixmoCap

    rng = np.random.default_rng(0)
    images, source, data_dir = (os.path.join(root, d) for d in ("images", "hub/pixmo-cap/data", "data"))
    os.makedirs(images, exist_ok=True)
    os.makedirs(source, exist_ok=True)
    rows = []
    for i in range(n_images):
        url = f"http://bench.test/{i}.jpg"
        with open(os.path.join(images, hub.url_filename(url)), "wb") as f:
            f.write(photo_jpeg(rng))
        # PixMo-Cap captions average about 200 words; transcripts are shorter.
        rows.append({"image_url": url, "caption": text(rng, 1100), "transcripts": [text(rng, 500), text(rng, 400)]})
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(source, "train-00000-of-00001.parquet"))
    builder = PixmoCap(data_dir=data_dir, source=os.path.join(root, "hub"), images=images,
                       split_sizes={"validation": 0})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        builder.download_and_prepare(file_format="array_record", download_dir=os.path.join(root, "scratch"))
    return data_dir


def loader_rate(data_dir: str, workers: int, batch: int, batches: int) -> dict:
    import input_pipeline
    from configs import molmo_7b_d_pretrain

    cfg = molmo_7b_d_pretrain.get_config()
    cfg.batch_size = batch
    cfg.data.update(data_dir=data_dir, num_workers=workers)
    cfg.data.tokenizer = input_pipeline.TINY_TOKENIZER
    loader = input_pipeline.make_train_iterator(cfg)
    try:
        first = next(loader)  # process start-up and the first batch: not timed
        start = time.perf_counter()
        lengths = []
        for _ in range(batches):
            out = next(loader)
            lengths.append(float(np.mean(np.sum(out["input_ids"] != -1, axis=1))))
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    return {"workers": workers, "examples_per_s": batch * batches / seconds, "ms_per_example": 1e3 * seconds / (batch * batches),
            "batch_shape": list(first["input_ids"].shape), "images_shape": list(first["images"].shape),
            "mean_tokens": float(np.mean(lengths)), "counts": loader.get_state()["counts"]}


def bare_preprocess_ms(data_dir: str, n: int) -> float:
    """ms per example of record read + conversion + preprocessing alone (no collation, no grain), the
    same process and records: the floor the loader's per-example time is compared with."""
    import collections

    import input_pipeline
    from configs import molmo_7b_d_pretrain

    cfg = molmo_7b_d_pretrain.get_config()
    cfg.data.update(data_dir=data_dir)
    cfg.data.tokenizer = input_pipeline.TINY_TOKENIZER
    maker = input_pipeline.make_train_iterator(cfg).maker
    rt, spec = maker.runtime(), maker.sources[0][0]
    rt.preprocessor(spec.convert(rt.sources[0][0], np.random.default_rng(0), collections.Counter()),
                    np.random.default_rng(0))  # warm caches (resize weights)
    start = time.perf_counter()
    for i in range(n):
        record = rt.sources[0][i % len(rt.sources[0])]
        rng = np.random.default_rng(i)
        rt.preprocessor(spec.convert(record, rng, collections.Counter()), rng)
    return 1e3 * (time.perf_counter() - start) / n


def v5p_demand(mfu: float, crops: int = 7, seq_len: int = 2304) -> dict:
    """Examples/s one v5p host (4 chips at 459 TFLOP/s bf16) trains through at `mfu`."""
    from molmo_jax import config as config_lib
    from molmo_jax.analysis import flops

    host = 4 * flops.PEAK_FLOPS["tpu v5p"] * mfu
    return {name: host / flops.train_step_flops(config_lib.get_config(name), 1, seq_len, crops)
            for name in ("molmoe_1b", "molmo_7b_d", "molmo_72b")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="examples per batch (one process)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per setting")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the v5p demand (default 0.4)")
    args = parser.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        data_dir = build_pixmo_cap(root, args.images)
        print(f"built {args.images} 640x480 JPEG records in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        bare = bare_preprocess_ms(data_dir, args.batch * args.batches // 2)
        results = [loader_rate(data_dir, int(w), args.batch, args.batches) for w in args.workers.split(",")]
        bare_after = bare_preprocess_ms(data_dir, args.batch * args.batches // 2)
    print(json.dumps({"bare_preprocess_ms_per_example": [round(bare, 1), round(bare_after, 1)]}))
    for r in results:
        print(json.dumps(r))
    best_per_worker = max(r["examples_per_s"] / max(1, r["workers"]) for r in results if r["workers"] >= 1)
    demand = v5p_demand(args.mfu)
    print(f"\nv5p host (4 chips, MFU {args.mfu:.0%}, 7 crops, seq 2304) consumes, examples/s:")
    for name, rate in demand.items():
        print(f"  {name}: {rate:.1f} -> {rate / best_per_worker:.2f} worker cores at {best_per_worker:.1f} ex/s/worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
