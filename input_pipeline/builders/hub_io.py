"""Helpers of the Hub dataset builders (`hub.py`): finding parquet files, reading rows, checking
downloaded images, grouping rows per image, the validation split rule, point normalisation."""
from __future__ import annotations

import hashlib
import io
import math
import pathlib
import warnings
from collections.abc import Iterable, Iterator, Sequence

from PIL import Image

from input_pipeline.builders.base import BuildArgumentError

MAX_PIXELS = 89_478_485  # the loader's default limit (PIL's own): larger images are skipped here already
VAL_SALT = "molmo_jax/val:"
FAILED_DIR = ".failed"  # where tools.download_pixmo notes the URLs that failed
PIXMO_REPOS = ("pixmo-cap", "pixmo-ask-model-anything", "pixmo-cap-qa", "pixmo-points", "pixmo-points-eval",
               "pixmo-count", "pixmo-point-explanations", "pixmo-docs", "pixmo-clocks")


class SkipRecord(Exception):
    """Raised while reading a source record that must be dropped; the message is the (short) reason."""


def url_filename(url: str) -> str:
    """Name of a downloaded image: hex SHA-256 of the URL (the original's downloader's rule)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Parquet files

def _belongs_to(path: pathlib.Path, root: pathlib.Path, repo: str) -> bool:
    parts = path.relative_to(root).parts[:-1]
    return any(p == repo or p.endswith("--" + repo) for p in parts)


def find_parquet_files(source: str, repo: str, split: str, config: str | None = None,
                       strict: bool = False) -> list[pathlib.Path]:
    """Sorted parquet files of `split` (and of `config`, a folder name, when given) of a Hub dataset.
    strict: only files below a folder named after `repo` (no fallback to every file)."""
    root = pathlib.Path(source)
    every = sorted(root.rglob("*.parquet"))
    mine = [p for p in every if _belongs_to(p, root, repo)]
    if mine or strict:
        candidates = mine
    else:  # a dataset's own folder: every file, except those below another PixMo dataset's folder
        candidates = [p for p in every if not any(_belongs_to(p, root, r) for r in PIXMO_REPOS if r != repo)]
    if config is not None:
        candidates = [p for p in candidates if config in p.relative_to(root).parts[:-1]]
    return [p for p in candidates if p.name.split("-")[0].split(".")[0] == split]


def pq_schema_names(path: pathlib.Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def check_columns(files: Sequence[pathlib.Path], required: Iterable[str]) -> None:
    """BuildArgumentError naming the file and the columns it lacks (read from the parquet footer)."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            names = set(pq.read_schema(path).names)
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise BuildArgumentError(f"{path}: not a readable parquet file ({error})") from None
        missing = sorted(set(required) - names)
        if missing:
            raise BuildArgumentError(f"{path}: missing column(s) {missing}; it has {sorted(names)}")


def read_rows(files: Sequence[pathlib.Path], columns: Sequence[str]) -> Iterator[dict]:
    """Rows (dicts of the wanted columns that exist) of the files, in file then row order."""
    import pyarrow.parquet as pq

    for path in files:
        present = [c for c in columns if c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=present)
        for batch in table.to_batches(max_chunksize=4096):
            yield from batch.to_pylist()


# ---------------------------------------------------------------------------------------------
# Images

def inspect_image(data: bytes, expected_sha256: str | None = None) -> tuple[int, int]:
    """(width, height) declared by an image file; SkipRecord with the reason if it cannot be used.

    Only the header is read (as the original's check): truncated pixel data is found by the loader,
    which skips and counts such images too.
    """
    if not data:
        raise SkipRecord("empty image file")
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256.lower():
        raise SkipRecord("image sha256 mismatch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise SkipRecord("image too large") from None
    except Exception:  # noqa: BLE001 - anything PIL cannot identify (incl. the downloader's error notes)
        raise SkipRecord("image not decodable") from None
    if width <= 0 or height <= 0:
        raise SkipRecord("zero-sized image")
    if width * height > MAX_PIXELS:
        raise SkipRecord("image too large")
    return width, height


class ImageFolder:
    """Downloaded images named by the SHA-256 of their URL."""

    def __init__(self, folder: str):
        self.folder = pathlib.Path(folder)

    def read(self, url: str) -> bytes:
        name = url_filename(url)
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            # tools.download_pixmo leaves a note in .failed/ for URLs that gave no usable image.
            failed = (self.folder / FAILED_DIR / name).is_file()
            raise SkipRecord("download failed" if failed else "image not downloaded") from None
        except OSError:
            raise SkipRecord("image file unreadable") from None


def embedded_image_bytes(value) -> bytes:
    """Bytes of an HF `Image` column cell ({"bytes": ..., "path": ...}) or a plain binary cell."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not value:
        raise SkipRecord("no embedded image")
    return bytes(value)


# ---------------------------------------------------------------------------------------------
# Rows -> image records

def group_by(rows: Iterable[dict], key: str) -> list[tuple[str, list[dict]]]:
    """Rows grouped by `key`: groups in order of first appearance, rows in dataset order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return list(groups.items())


def columns_as_lists(rows: Sequence[dict], columns: Sequence[str]) -> dict:
    """One list per column with that column's value in each row (the grouped record layout)."""
    return {c: [row.get(c) for row in rows] for c in columns}


def validation_keys(keys: Iterable[str], n_val: int) -> set[str]:
    """The `n_val` keys with the smallest salted SHA-256 (see the module docstring)."""
    ranked = sorted(keys, key=lambda k: hashlib.sha256((VAL_SALT + k).encode("utf-8")).hexdigest())
    return set(ranked[:n_val])


def _number(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def point_pairs(points) -> list[list]:
    """Hub points (list of {x, y}, dict of lists {x: [...], y: [...]}, or [[x, y], ...]) -> [[x, y], ...]
    with non-finite values as None (JSON null)."""
    if points is None:
        return []
    if isinstance(points, dict):
        xs, ys = points.get("x") or [], points.get("y") or []
        return [[_number(x), _number(y)] for x, y in zip(xs, ys)]
    out = []
    for p in points:
        if isinstance(p, dict):
            out.append([_number(p.get("x")), _number(p.get("y"))])
        else:
            x, y = (list(p) + [None, None])[:2]
            out.append([_number(x), _number(y)])
    return out
