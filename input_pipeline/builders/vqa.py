"""A generic builder for VQA-style datasets (the academic sets of the SFT mixture enter through it).

    python -m tools.build_data vqa --name text_vqa --style text_vqa --source DIR [--images DIR]

Input: JSONL (`*.jsonl`) or parquet (`*.parquet`) files anywhere under --source; a file's split is its
name's prefix (`train`, `validation` or `val`, `test`). One row = one question:
- the image, one of: `image` (a path, absolute or relative to --images or to the file's folder; or
  encoded bytes / an HF Image cell {"bytes": ...} in parquet), `image_path`, or `image_url` (the file
  named by the URL's sha256 in --images, as tools.download_pixmo stores it);
- `question`: str;
- the target, one of: `answer` (str), `answers` (list of str: multi-reference, the loader trains on the
  most frequent), or `options` (list of str) with `answer` = the correct option's text or 0-based index;
- optional: `image_id` (rows sharing it are one image; default: the image reference), `style`
  (overrides --style for the row), `weight` (loss weight, e.g. ChartQA's human/augmented weighting).
- or, instead of the target, `points` ([[x, y], ...] pixels; [] = none there) with `label`, for styles
  `pointing` / `point_count` (`image_index` for which image of several) and on a video also `tracking`, with
  `times` (the second of each point) and `ids` (each point's object; required for tracking).
Instead of one image, a row may hold `images` (a list of image references: several images, for a
Molmo2) or `video` (a folder of frame files, read in name order, or a list of frame references) with
`fps`, the rate the frames were taken at (optional). Their bytes after the first are stored in
`more_images`, and `annotations` says `"media": "images" | "video"` (and `"fps"`).

All questions of an image become one record (packed into one training example) unless --no-pack.
The dataset is stored as TFDS config `--name` of builder `vqa` (so several sets live side by side), with
the record schema of `hub.py`; `annotations` = {"qas": [{style, question, answer | answers | options,
weight}, ...]}.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re

import tensorflow_datasets as tfds

from molmo_jax import jsonl
from molmo_jax.preprocess.image_io import frame_files

from input_pipeline.builders import hub
from input_pipeline.builders.base import BuildArgumentError
from input_pipeline.builders.hub import SkipRecord

SPLIT_PREFIXES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _split_of(path: pathlib.Path) -> str | None:
    prefix = re.split(r"[-_.]", path.name, maxsplit=1)[0].lower()
    return SPLIT_PREFIXES.get(prefix)


def _read_jsonl(path: pathlib.Path):
    for number, row in jsonl.records(path):
        if isinstance(row, str):
            raise BuildArgumentError(f"{path}:{number}: {row}")
        yield row


class Vqa(hub.HubBuilder):
    """A VQA-style dataset (question(s) and answer(s) about images) from JSONL or parquet files."""
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "One image per record.",
                     "1.1.0": "Records of several images or a video's frames (`more_images`)."}
    MORE_IMAGES = True
    HUB_SPLITS = ("train", "validation", "test")
    SPLIT_SIZES_HELP = "keep at most N examples of a split (e.g. train=1000), for small trial builds"

    def __init__(self, *, style: str | None = None, pack: bool = True, **kwargs):
        self.style, self.pack = style, pack
        super().__init__(**kwargs)

    @classmethod
    def add_arguments(cls, parser):
        group = parser.add_argument_group("vqa")
        group.add_argument("--name", required=True, help="dataset name (lower case), e.g. text_vqa: the TFDS "
                           "config and the name mixtures use")
        group.add_argument("--style", default=None, help="style tag of its conversations (default: --name)")
        group.add_argument("--no-pack", dest="pack", action="store_false",
                           help="one record per question instead of one per image")

    @classmethod
    def from_arguments(cls, data_dir, source, images, split_sizes, args):
        if not _NAME.fullmatch(args.name or ""):
            raise BuildArgumentError(f"--name {args.name!r}: use lower-case letters, digits and _")
        if not source or not os.path.isdir(source):
            raise BuildArgumentError(f"--source {source!r} must be a folder holding the JSONL or parquet files")
        if images and not os.path.isdir(images):
            raise BuildArgumentError(f"--images {images!r} is not a folder")
        config = tfds.core.BuilderConfig(name=args.name, description=f"VQA-style dataset {args.name}")
        builder = cls(data_dir=data_dir, config=config, source=source, images=images, split_sizes=split_sizes,
                      style=args.style or args.name, pack=args.pack)
        builder.check_source()
        return builder

    def _metadata(self):
        return {"style": self.style or "", "packed": self.pack, "split_sizes": dict(sorted(self.split_sizes.items()))}

    def files(self) -> dict[str, list[pathlib.Path]]:
        out: dict[str, list[pathlib.Path]] = {}
        for path in sorted(pathlib.Path(self.source).rglob("*")):
            split = _split_of(path) if path.suffix in (".jsonl", ".parquet") else None
            if split:
                out.setdefault(split, []).append(path)
        return out

    def check_source(self):
        files = self.files()
        if not files:
            raise BuildArgumentError(f"no train*/validation*/test* .jsonl or .parquet files under {self.source!r}")
        parquet = [p for paths in files.values() for p in paths if p.suffix == ".parquet"]
        hub.check_columns(parquet, ("question",))
        for path in (p for paths in files.values() for p in paths if p.suffix == ".jsonl"):
            for _ in _read_jsonl(path):  # a malformed line is named now, before anything is written
                pass

    def output_splits(self):
        return tuple(s for s in self.HUB_SPLITS if s in self.files())

    def _rows(self, split):
        for path in self.files().get(split, []):
            rows = _read_jsonl(path) if path.suffix == ".jsonl" else hub.read_rows([path], _columns(path))
            for row in rows:
                row["_folder"] = str(path.parent)
                yield row

    def _split_records(self, split):
        records: dict[str, list[dict]] = {}
        for number, row in enumerate(self._rows(split)):
            key = str(row.get("image_id") or _image_reference(row)) if self.pack else f"{number:09d}"
            records.setdefault(key, []).append(row)
        return [(key, str(rows[0].get("image_url") or ""), rows) for key, rows in records.items()]

    def clean_row(self, row):
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise SkipRecord("question missing or empty")
        qa = {"style": str(row.get("style") or self.style), "question": question.strip()}
        options, answer, answers = row.get("options"), row.get("answer"), row.get("answers")
        if row.get("points") is not None:
            qa.update(_point_fields(row))
        elif options is not None:
            if not isinstance(answer, (str, int)) or isinstance(answer, bool):
                raise SkipRecord("multiple-choice question without an answer")
            qa.update(options=[str(o) for o in options], answer=answer)
        elif isinstance(answer, str) and answer.strip():
            qa["answer"] = answer.strip()
        elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
            qa["answer"] = str(answer)
        elif isinstance(answers, (list, tuple)) and any(isinstance(a, str) and a.strip() for a in answers):
            qa["answers"] = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
        else:
            raise SkipRecord("answer missing or empty")
        if row.get("weight") is not None:
            qa["weight"] = float(row["weight"])
        fps = row.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
            raise SkipRecord("fps is not a positive number")
        row["_qa"] = qa
        return row

    def _find(self, row, value, what: str = "image file", is_folder: bool = False) -> pathlib.Path:
        for folder in ([self.images] if self.images else []) + [row["_folder"]]:
            path = pathlib.Path(folder) / value
            if path.is_dir() if is_folder else path.is_file():
                return path
        raise SkipRecord(f"{what} not found")

    def _reference_bytes(self, row, value) -> bytes:
        if isinstance(value, (bytes, bytearray, dict)):
            return hub.embedded_image_bytes(value)
        if isinstance(value, str) and value:
            return self._find(row, value).read_bytes()
        raise SkipRecord("empty image reference")

    def image_bytes(self, url, rows):
        row = rows[0]
        if row.get("images") is not None:
            refs = row["images"]
            if not isinstance(refs, (list, tuple)) or not refs:
                raise SkipRecord("images is not a non-empty list")
            return [self._reference_bytes(row, ref) for ref in refs]
        if row.get("video") is not None:
            refs = row["video"]
            if isinstance(refs, str) and refs:
                try:
                    refs = frame_files(self._find(row, refs, "video frames folder", is_folder=True))
                except ValueError:
                    raise SkipRecord("video frames folder without image files") from None
            if not isinstance(refs, (list, tuple)) or not refs:
                raise SkipRecord("video is neither a frames folder nor a non-empty list of frames")
            return [self._reference_bytes(row, ref) for ref in refs]
        value = row.get("image", row.get("image_path"))
        if isinstance(value, (bytes, bytearray, dict)) or (isinstance(value, str) and value):
            return self._reference_bytes(row, value)
        if url:
            if not self.images:
                raise SkipRecord("image_url given but no --images folder")
            return hub.ImageFolder(self.images).read(url)
        raise SkipRecord("row without an image")

    def annotations(self, rows):
        out = {"qas": [row["_qa"] for row in rows]}
        row = rows[0]
        if row.get("images") is not None:
            out["media"] = "images"
        elif row.get("video") is not None:
            out["media"] = "video"
            if row.get("fps") is not None:
                out["fps"] = float(row["fps"])
        return out


def _numbers(value, n=None) -> bool:
    return (isinstance(value, (list, tuple)) and (n is None or len(value) == n)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _point_fields(row) -> dict:
    """A pointing / counting / tracking row's fields (the Molmo2 formatter writes the target from them)."""
    points = row["points"]
    if not isinstance(points, (list, tuple)) or not all(_numbers(p, 2) for p in points):
        raise SkipRecord("points is not a list of [x, y] pairs")
    out = {"points": [[float(x), float(y)] for x, y in points], "label": str(row.get("label") or "")}
    for key in ("times", "ids"):
        if row.get(key) is not None:
            if not _numbers(row[key], len(points)):
                raise SkipRecord(f"{key} is not a list of one number per point")
            out[key] = [float(v) for v in row[key]] if key == "times" else [int(v) for v in row[key]]
    if isinstance(row.get("image_index"), int) and not isinstance(row["image_index"], bool):
        out["image_index"] = row["image_index"]
    return out


def _columns(path):
    names = set(hub.pq_schema_names(path))
    wanted = ("image", "image_path", "image_url", "image_id", "question", "answer", "answers", "options",
              "style", "weight", "images", "video", "fps", "points", "label", "times", "ids", "image_index")
    return tuple(c for c in wanted if c in names)


def _image_reference(row) -> str:
    for key in ("images", "video"):
        if row.get(key) is not None:
            refs = row[key] if isinstance(row[key], (list, tuple)) else [row[key]]
            return f"{key}:" + "|".join(r if isinstance(r, str) else _image_reference({"image": r}) for r in refs)
    for key in ("image_url", "image_path"):
        if row.get(key):
            return str(row[key])
    value = row.get("image")
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or b""
    return hashlib.sha256(bytes(value or b"")).hexdigest()
