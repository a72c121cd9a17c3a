"""The one error every weight format raises, and reading the JSON files checkpoints carry."""
from __future__ import annotations

import json
import pathlib


class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not match the model: names the file, the key and the
    shapes involved, in one line."""


def read_json(path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def require(d: dict, key: str, what: str):
    """d[key], or a WeightsError saying that the `what` config lacks it."""
    if d.get(key) is None:
        raise WeightsError(f"{what} config has no {key!r}")
    return d[key]


def listed(items, n: int = 5) -> str:
    """'a, b, c, d, e and 3 more' (sorted)."""
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
