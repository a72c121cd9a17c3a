"""What every dataset builder run by `python -m tools.build_data` shares.

A builder is a TFDS `GeneratorBasedBuilder` written as ArrayRecord files (no TensorFlow needed as long
as images are given as encoded bytes or PIL images). On top of TFDS this base class adds:
- a command-line contract (`add_arguments`, `from_arguments`) so that the CLI stays generic;
- skip accounting: a builder calls `skips.skip(reason)` for each source record it drops (dead or
  corrupt image, empty field, ...). The counts per split and reason are stored in the dataset's
  `metadata.json` (TFDS `MetadataDict`), so they survive the build and can be reported later.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json

import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer


class BuildArgumentError(ValueError):
    """Bad arguments for a builder (the CLI reports it and exits with status 2)."""


class SkipCounter:
    """Counts the records of one split that a builder dropped, by reason."""

    def __init__(self, split: str):
        self.split = split
        self.by_reason: collections.Counter[str] = collections.Counter()

    def skip(self, reason: str, n: int = 1) -> None:
        self.by_reason[reason] += n

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


def parse_split_sizes(text: str, known_splits: tuple[str, ...]) -> dict[str, int]:
    """'train=4000,validation=200' -> {'train': 4000, 'validation': 200}; a clear error otherwise."""
    sizes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        split, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise BuildArgumentError(f"--split-sizes: expected SPLIT=N (N >= 0), got {item!r}")
        if split.strip() not in known_splits:
            raise BuildArgumentError(f"--split-sizes: unknown split {split.strip()!r}; "
                                     f"this dataset has {', '.join(known_splits)}")
        sizes[split.strip()] = int(value)
    if not sizes:
        raise BuildArgumentError(f"--split-sizes: nothing given in {text!r}")
    return sizes


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders in `input_pipeline.builders` (see the registry in `__init__`)."""

    SPLITS: tuple[str, ...] = ("train", "validation", "test")
    # What `--split-sizes` means for this builder, shown in the CLI help.
    SPLIT_SIZES_HELP = "examples per split"

    # --- command line -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this builder's own options (beyond --data-dir/--source/--images/--split-sizes)."""

    @classmethod
    def from_arguments(cls, data_dir: str, source: str | None, images: str | None,
                       split_sizes: dict[str, int] | None, args: argparse.Namespace) -> "RecordBuilder":
        """A builder instance for these arguments; raises BuildArgumentError on bad ones."""
        raise NotImplementedError

    # --- building -----------------------------------------------------------------------------
    def _make_info(self, features: tfds.features.FeaturesDict, description: str, **metadata) -> tfds.core.DatasetInfo:
        """DatasetInfo with a MetadataDict (written to metadata.json) holding `metadata` and skip counts."""
        info_metadata = tfds.core.MetadataDict()
        info_metadata.update(metadata)
        info_metadata["skipped"] = {}
        return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                     metadata=info_metadata)

    def _record_skips(self, counter: SkipCounter) -> None:
        """Store a finished split's skip counts in the dataset metadata (call after the last example)."""
        self.info.metadata["skipped"][counter.split] = dict(sorted(counter.by_reason.items()))

    def _download_and_prepare(self, dl_manager, download_config=None):
        with deterministic_serialization():
            super()._download_and_prepare(dl_manager, download_config)


def split_report(builder: tfds.core.DatasetBuilder) -> dict[str, dict]:
    """{split: {"written": n, "skipped": {reason: n}}} of a prepared dataset.

    Works on the builder that built it and on `tfds.builder_from_directory(...)`, since the skip counts
    are read from the stored metadata.
    """
    skipped = (builder.info.metadata or {}).get("skipped", {})
    return {name: {"written": int(split.num_examples), "skipped": dict(skipped.get(name, {}))}
            for name, split in sorted(builder.info.splits.items())}


@contextlib.contextmanager
def deterministic_serialization():
    """Serialize records with map keys in sorted order while building.

    TFDS stores each record as a tf.train.Example whose `features.feature` is a protobuf map; the
    default serialization writes map entries in hash-table order, which differs between processes,
    so two builds of the same data gave different bytes. `deterministic=True` sorts the entries;
    readers are unaffected (a map's wire order carries no meaning).
    """
    serializer_cls = example_serializer.ExampleSerializer
    original = serializer_cls.serialize_example

    def serialize_example(self, example):
        return self.get_tf_example(example).SerializeToString(deterministic=True)

    serializer_cls.serialize_example = serialize_example
    try:
        yield
    finally:
        serializer_cls.serialize_example = original


def canonical_json(value) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
