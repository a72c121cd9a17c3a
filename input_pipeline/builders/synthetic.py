"""TFDS builder of the synthetic PixMo (input_pipeline/synthetic.py), written as ArrayRecord files.

Record schema (one record per image; all text fields are UTF-8):
- `image`: PNG bytes (TFDS `Image`, encoding png), RGB, `height` x `width`;
- `width`, `height`: int32, the image size in pixels;
- `kind`: "shapes" | "clock" | "chart";
- `message_list`: JSON list of conversations in the example contract; `points` are lists of [x, y]
  in pixels (`point_scale` 0), turned back into float32 [N, 2] arrays by `load_example`;
- `metadata`: JSON object: kind, width, height, split, index, seed, the scene description (`objects`,
  `hour`/`minute`/`time`, `bars`) and `point_targets` (per pointing/counting conversation: its index in
  `message_list`, style, label, count and points in pixels), the ground truth for evaluation.

Splits train / validation / test are rendered from disjoint seed sequences (seed, split, index).
The TFDS config name is "default" for the default arguments and "custom_<hash of the arguments>"
otherwise, so datasets built with different arguments never overwrite each other. The same arguments
give byte-identical ArrayRecord files.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from input_pipeline import synthetic
from input_pipeline.builders.base import BuildArgumentError, RecordBuilder, SkipCounter, canonical_json

DEFAULT_SPLIT_SIZES = (("train", 4000), ("validation", 200), ("test", 200))
DEFAULT_SEED = 0


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    options: synthetic.SyntheticOptions = synthetic.SyntheticOptions()
    split_sizes: tuple[tuple[str, int], ...] = DEFAULT_SPLIT_SIZES
    seed: int = DEFAULT_SEED


def _knobs(options, split_sizes, seed) -> dict:
    return {"options": dataclasses.asdict(options), "split_sizes": dict(split_sizes), "seed": seed}


DEFAULT_CONFIG = SyntheticConfig(
    name="default", description="synthetic PixMo, default arguments: "
    + canonical_json(_knobs(synthetic.SyntheticOptions(), DEFAULT_SPLIT_SIZES, DEFAULT_SEED)))


def make_config(options: synthetic.SyntheticOptions | None = None, split_sizes: Mapping[str, int] | None = None,
                seed: int = DEFAULT_SEED) -> SyntheticConfig:
    """The builder config for these arguments; `split_sizes` overrides the default size of the splits it names."""
    options = options or synthetic.SyntheticOptions()
    sizes = dict(DEFAULT_SPLIT_SIZES)
    for split, size in (split_sizes or {}).items():
        if split not in sizes:
            raise BuildArgumentError(f"unknown split {split!r}; the synthetic dataset has {', '.join(sizes)}")
        if int(size) < 0:
            raise BuildArgumentError(f"split size of {split!r} must be >= 0, got {size}")
        sizes[split] = int(size)
    if not any(sizes.values()):
        raise BuildArgumentError("every split has size 0: nothing to build")
    if seed < 0:
        raise BuildArgumentError(f"seed must be >= 0, got {seed}")
    knobs = _knobs(options, tuple(sizes.items()), seed)
    if knobs == _knobs(DEFAULT_CONFIG.options, DEFAULT_CONFIG.split_sizes, DEFAULT_CONFIG.seed):
        return DEFAULT_CONFIG
    digest = hashlib.sha256(canonical_json(knobs).encode()).hexdigest()[:10]
    return SyntheticConfig(name=f"custom_{digest}", description="synthetic PixMo: " + canonical_json(knobs),
                           options=options, split_sizes=tuple(sizes.items()), seed=seed)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image (deterministic for a given Pillow/zlib)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def conversations_to_json(message_list: list[dict]) -> str:
    """Conversations -> JSON; point arrays become lists of [x, y] rounded to 0.01 pixel."""
    def plain(conversation):
        out = dict(conversation)
        if "points" in out:
            out["points"] = [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(out["points"])]
        return out
    return canonical_json([plain(c) for c in message_list])


def conversations_from_json(text: str) -> list[dict]:
    """Inverse of `conversations_to_json`: `points` become float32 arrays [N, 2] (N may be 0)."""
    conversations = json.loads(text)
    for conversation in conversations:
        if "points" in conversation:
            conversation["points"] = np.asarray(conversation["points"], np.float32).reshape(-1, 2)
    return conversations


class SyntheticPixmo(RecordBuilder):
    """The synthetic PixMo; registered with tools.build_data as `synthetic`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Shapes (pointing, counting, QA), clocks and bar charts."}
    BUILDER_CONFIGS = [DEFAULT_CONFIG]
    SPLIT_SIZES_HELP = "images per split (defaults train=4000,validation=200,test=200)"

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "width": np.int32,
            "height": np.int32,
            "kind": tfds.features.Text(),
            "message_list": tfds.features.Text(),
            "metadata": tfds.features.Text(),
        })
        config = self.builder_config
        return self._make_info(features, description=__doc__, point_scale="pixels (point_scale 0)",
                               arguments=_knobs(config.options, config.split_sizes, config.seed))

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is rendered, nothing is downloaded
        return {split: self._generate_examples(split, size)
                for split, size in self.builder_config.split_sizes if size > 0}

    def _generate_examples(self, split: str, size: int):
        config = self.builder_config
        skips = SkipCounter(split)  # nothing is ever skipped here; kept for the common report
        for index in range(size):
            example = synthetic.render_example(config.options, config.seed, split, index)
            image = example["image"]
            yield index, {
                "image": encode_png(image),
                "width": image.shape[1],
                "height": image.shape[0],
                "kind": example["metadata"]["kind"],
                "message_list": conversations_to_json(example["message_list"]),
                "metadata": canonical_json(example["metadata"]),
            }
        self._record_skips(skips)

    # --- command line -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("synthetic")
        group.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed (default %(default)s)")
        group.add_argument("--image-size", default=None, metavar="N|WxH",
                           help="image size in pixels, e.g. 112 or 160x112 (default 112)")
        group.add_argument("--min-objects", type=int, default=None, help="fewest shapes per scene (default 1)")
        group.add_argument("--max-objects", type=int, default=None, help="most shapes per scene (default 6)")
        group.add_argument("--grid", type=int, default=None,
                           help="snap shape centres to an N x N grid (default 0: anywhere)")
        group.add_argument("--kinds", default=None, metavar="KIND=WEIGHT,...",
                           help="image kinds and mix weights, e.g. shapes=0.7,clock=0.15,chart=0.15")

    @classmethod
    def from_arguments(cls, data_dir, source, images, split_sizes, args) -> "SyntheticPixmo":
        if source or images:
            raise BuildArgumentError("the synthetic dataset renders its images: --source and --images do not apply")
        changes = {}
        if args.image_size:
            changes["image_size"] = _parse_image_size(args.image_size)
        if args.min_objects is not None:
            changes["min_objects"] = args.min_objects
        if args.max_objects is not None:
            changes["max_objects"] = args.max_objects
        if args.grid is not None:
            changes["grid"] = args.grid
        if args.kinds:
            changes["kinds"], changes["kind_weights"] = _parse_kinds(args.kinds)
        try:
            options = dataclasses.replace(synthetic.SyntheticOptions(), **changes)
        except ValueError as error:
            raise BuildArgumentError(str(error)) from None
        return cls(data_dir=data_dir, config=make_config(options, split_sizes, args.seed))


def _parse_image_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise BuildArgumentError(f"--image-size: expected N or WxH, got {text!r}")
    width, height = (int(parts[0]), int(parts[-1]))
    return width, height


def _parse_kinds(text: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    kinds, weights = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, weight = item.partition("=")
        try:
            weights.append(float(weight) if weight else 1.0)
        except ValueError:
            raise BuildArgumentError(f"--kinds: bad weight in {item!r}") from None
        kinds.append(kind.strip())
    return tuple(kinds), tuple(weights)


def load_example(record: Mapping) -> dict:
    """A stored record (as `tfds.data_source` yields it) -> the example contract.

    `image` may be the decoded uint8 array (default decoding) or the PNG bytes (with
    `decoders={"image": tfds.decode.SkipDecoding()}`, e.g. to decode in grain workers instead).
    """
    missing = [key for key in ("image", "message_list", "metadata") if key not in record]
    if missing:
        raise KeyError(f"synthetic record lacks field(s) {missing}; it has {sorted(record)}")
    image = record["image"]
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as decoded:
                image = np.asarray(decoded.convert("RGB"))
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise ValueError(f"synthetic record: `image` bytes are not a decodable image ({error})") from None
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"synthetic record: `image` must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    texts = {}
    for key in ("message_list", "metadata"):
        value = record[key]
        value = value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value
        try:
            texts[key] = conversations_from_json(value) if key == "message_list" else json.loads(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"synthetic record: `{key}` is not valid JSON ({error})") from None
    return {"image": image, "message_list": texts["message_list"], "metadata": texts["metadata"]}
