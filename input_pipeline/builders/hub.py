"""What the builders of Hugging Face datasets (PixMo, VQA-style sets) share: finding the Hub's parquet
files, looking up downloaded images, validating them, grouping rows per image, the validation split.

Inputs (see `tools.build_data`):
- `--source DIR`: a folder holding the Hub's parquet files anywhere below it: a dataset's own folder
  (`data/train-00000-of-00003.parquet`), a Hub cache snapshot, or a folder with several datasets. A
  file belongs to dataset `allenai/pixmo-points` when a folder on its path is named `pixmo-points`
  (or ends in `--pixmo-points`, as the Hub cache names them); if no file is below such a folder,
  every parquet file under DIR is taken except those below another PixMo dataset's folder. The
  split is the file name's prefix (`train-...`).
- `--images DIR`: the downloaded images, each file named by the hex SHA-256 of its URL (UTF-8), as
  `tools.download_pixmo` and the original's downloader write them.

Record schema of every builder here (one record per example; TFDS ArrayRecord):
- `image`: the image file's bytes exactly as downloaded (or as embedded in the parquet), so the
  SHA-256 can be checked again; decoded by the loader, in its worker processes;
- `image_url`: str ('' for embedded images); `image_sha256`: hex SHA-256 of `image`;
- `width`, `height`: int32, the size the image file declares (before any EXIF rotation);
- `more_images` (builders with MORE_IMAGES, the VQA one): the bytes of a record's further images or
  video frames after `image`, in order (empty for a one-image record);
- `annotations`: canonical JSON object of the dataset's columns under their Hub names. For datasets
  grouped per image each column is a list with one entry per Hub row (in dataset order); points are
  lists of [x, y] pairs (NaN written as null).

Validation split: when a dataset has only a Hub `train` split, the `n_val` image URLs of the Hub
data with the smallest SHA-256 of "molmo_jax/val:" + image_url form `validation`, the rest `train`.
The rule looks at every URL of the Hub file, dead or alive, so an image is in the same split on every
machine whatever downloaded; the price is that `validation` holds n_val minus the dead images (the
original splits the survivors, so its split differs between download runs, docs/architecture.md#pixmo-datasets).

TFDS config names do not depend on --split-sizes: building again with other sizes needs --overwrite.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import sys

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.builders.base import BuildArgumentError, RecordBuilder, SkipCounter, canonical_json
from input_pipeline.builders.hub_io import (  # noqa: F401 - re-exported: the builders use them as hub.X
    FAILED_DIR, ImageFolder, SkipRecord, check_columns, columns_as_lists, embedded_image_bytes,
    find_parquet_files, group_by, inspect_image, point_pairs, pq_schema_names, read_rows, url_filename,
    validation_keys)


# ---------------------------------------------------------------------------------------------
# The builder base

class HubBuilder(RecordBuilder, skip_registration=True):
    """Base of the builders reading a local copy of a Hub dataset.

    The default reading (`_source_records`) covers the URL-based datasets: rows of the Hub split are
    read, grouped per `image_url` when GROUPED (else one record per row), assigned to train or
    validation by the rule above, cleaned row by row (`clean_row`), and paired with the downloaded
    image; `annotations(rows)` gives the stored JSON. Subclasses set the class attributes and may
    override the hooks.
    """

    REPO = ""                      # Hub repository name, e.g. "pixmo-cap"
    COLUMNS: tuple[str, ...] = ()  # Hub columns read (`image_url` included); all must exist
    OPTIONAL_COLUMNS: tuple[str, ...] = ()
    GROUPED = False                # one record per image_url (lists per column) instead of per row
    SHA_CHECK = False              # compare the image bytes with the row's `image_sha256`
    N_VAL = 0                      # images held out for validation when the Hub has only `train`
    HUB_SPLITS: tuple[str, ...] = ("train",)
    MORE_IMAGES = False            # records may hold several images (or a video's frames): `image_bytes` a list
    SPLIT_SIZES_HELP = ("validation=N: images held out for validation (datasets with only a Hub train split); "
                        "train=N (or any split): keep at most N examples of it, for small trial builds")

    def __init__(self, *, source: str | None = None, images: str | None = None,
                 split_sizes: dict[str, int] | None = None, **kwargs):
        self.source, self.images, self.split_sizes = source, images, dict(split_sizes or {})
        self._rows_cache: dict[str, list] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_url": tfds.features.Text(),
            "image_sha256": tfds.features.Text(),
            "width": np.int32,
            "height": np.int32,
            "annotations": tfds.features.Text(),
            **({"more_images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))}
               if self.MORE_IMAGES else {}),
        })
        return self._make_info(features, description=self.__doc__, **self._metadata())

    def _metadata(self) -> dict:
        """Metadata stored with the dataset (metadata.json); subclasses add e.g. the point scale."""
        return {"hub_repo": f"allenai/{self.REPO}", "n_val": self.n_val() if self.N_VAL else 0,
                "split_sizes": dict(sorted(self.split_sizes.items()))}

    # --- command line -------------------------------------------------------------------------
    NEEDS_IMAGES = True

    @classmethod
    def from_arguments(cls, data_dir, source, images, split_sizes, args):
        if not source:
            raise BuildArgumentError(f"--source is required: a folder holding the Hub's parquet files of "
                                     f"allenai/{cls.REPO}")
        if not os.path.isdir(source):
            raise BuildArgumentError(f"--source {source!r} is not a folder")
        if cls.NEEDS_IMAGES and not images:
            raise BuildArgumentError("--images is required: the folder of downloaded images, named by the "
                                     "sha256 of their URL (python -m tools.download_pixmo)")
        if images and not os.path.isdir(images):
            raise BuildArgumentError(f"--images {images!r} is not a folder")
        builder = cls(data_dir=data_dir, source=source, images=images, split_sizes=split_sizes,
                      **cls.extra_builder_kwargs(args))
        builder.check_source()
        return builder

    @classmethod
    def extra_builder_kwargs(cls, args) -> dict:
        """Constructor arguments (e.g. the TFDS config) from the builder's own options."""
        del args
        return {}

    def source_files(self, hub_split: str) -> list[pathlib.Path]:
        return find_parquet_files(self.source, self.REPO, hub_split)

    def check_source(self) -> None:
        """BuildArgumentError when files or columns are missing, before anything is written."""
        for hub_split in self.HUB_SPLITS:
            files = self.source_files(hub_split)
            if not files:
                raise BuildArgumentError(f"no {hub_split}-*.parquet files of allenai/{self.REPO} under "
                                         f"{self.source!r}")
            check_columns(files, self.COLUMNS)

    # --- hooks --------------------------------------------------------------------------------
    def clean_row(self, row: dict) -> dict:
        """The row to keep (possibly repaired); SkipRecord(reason) drops it."""
        return row

    def record_skip_reason(self, url: str) -> str | None:
        """Why a whole image record is left out (e.g. held out for evaluation), or None."""
        del url
        return None

    def keep_row(self, row: dict) -> bool:
        """Rows outside this dataset (another subset, a held-out image): not counted as skips."""
        del row
        return True

    def annotations(self, rows: list[dict]) -> dict:
        names = [c for c in self.COLUMNS + self.OPTIONAL_COLUMNS if c not in ("image_url", "image_sha256")]
        if self.GROUPED:
            return columns_as_lists(rows, names)
        return {c: rows[0].get(c) for c in names}

    # --- building -----------------------------------------------------------------------------
    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        # TFDS cannot write an empty split: a split without a single usable record is left out (and
        # named in the metadata) instead of failing the whole build.
        splits, empty = {}, []
        for split in self.output_splits():
            skips = SkipCounter(split)
            if self._has_usable_record(split, skips):
                splits[split] = self._generate_examples(split)
            else:
                empty.append(split)
                self._record_skips(skips)
                reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skips.by_reason.items())) or "no records"
                print(f"{split}: not written, no usable record (skipped: {reasons})", file=sys.stderr)
        self.info.metadata["empty_splits"] = empty
        return splits

    def _has_usable_record(self, split: str, skips: SkipCounter) -> bool:
        """Stops at the first usable record: one image read for any real dataset. When there is none,
        `skips` holds why."""
        for _, _, data, expected_sha, _ in self._source_records(split, skips):
            try:
                inspect_image(data, expected_sha)
                return True
            except SkipRecord as reason:
                skips.skip(str(reason))
        return False

    def output_splits(self) -> tuple[str, ...]:
        return ("train", "validation") if self.N_VAL else self.HUB_SPLITS

    def n_val(self) -> int:
        return int(self.split_sizes.get("validation", self.N_VAL))

    def _hub_records(self, hub_split: str) -> list[tuple[str, str, list[dict]]]:
        """(key, image_url, rows) of a Hub split, cached (train and validation share one read)."""
        if hub_split not in self._rows_cache:
            rows = (r for r in read_rows(self.source_files(hub_split), self.COLUMNS + self.OPTIONAL_COLUMNS)
                    if self.keep_row(r))
            if self.GROUPED:
                records = [(url, url, group) for url, group in group_by(rows, "image_url")]
            else:
                records = [(f"{i:09d}", row.get("image_url", ""), [row]) for i, row in enumerate(rows)]
            self._rows_cache[hub_split] = records
        return self._rows_cache[hub_split]

    def _split_records(self, split: str):
        if not self.N_VAL:
            return self._hub_records(split)
        records = self._hub_records("train")
        urls = dict.fromkeys(url for _, url, _ in records)
        # A trial build with fewer images than n_val keeps half of them for training.
        held_out = validation_keys(urls, min(self.n_val(), len(urls) // 2))
        return [r for r in records if (r[1] in held_out) == (split == "validation")]

    def _source_records(self, split: str, skips: SkipCounter):
        """(key, url, image bytes, expected sha256 or None, annotations) of the split's usable records."""
        for key, url, rows in self._split_records(split):
            reason = self.record_skip_reason(url)
            if reason:
                skips.skip(reason)
                continue
            kept = []
            for row in rows:
                try:
                    kept.append(self.clean_row(dict(row)))
                except SkipRecord as reason:
                    skips.skip(str(reason))
            if not kept:
                continue
            try:
                data = self.image_bytes(url, kept)
            except SkipRecord as reason:
                skips.skip(str(reason))
                continue
            expected = kept[-1].get("image_sha256") if self.SHA_CHECK else None
            yield key, url, data, expected, self.annotations(kept)

    def image_bytes(self, url: str, rows: list[dict]) -> bytes | list[bytes]:
        """The record's image file bytes (with MORE_IMAGES: a list, the first stored as `image`)."""
        del rows
        return ImageFolder(self.images).read(url)

    def _generate_examples(self, split: str):
        skips = SkipCounter(split)
        limit = None if (split == "validation" and self.N_VAL) else self.split_sizes.get(split)
        written = 0
        for key, url, data, expected_sha, annotations in self._source_records(split, skips):
            if limit is not None and written >= limit:
                break
            data, *more = data if isinstance(data, list) else [data]
            try:
                width, height = inspect_image(data, expected_sha)
                for extra in more:
                    inspect_image(extra)
            except SkipRecord as reason:
                skips.skip(str(reason))
                continue
            written += 1
            yield key, {"image": data, "image_url": url or "", "image_sha256": hashlib.sha256(data).hexdigest(),
                        "width": width, "height": height, "annotations": canonical_json(annotations),
                        **({"more_images": more} if self.MORE_IMAGES else {})}
        self._record_skips(skips)
