"""JSON Lines, read one way by every tool: each line's object, or the reason it cannot be used."""
from __future__ import annotations

import json
from collections.abc import Iterator


def records(path) -> Iterator[tuple[int, dict | str]]:
    """(line number, object) for each non-blank line, or (line number, reason) for a line that is not
    UTF-8, not JSON or not an object; the caller decides whether a bad line stops it. Opening the file
    raises OSError as usual."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, f"not UTF-8 text (byte {e.start} of the line); save the file as UTF-8"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, f"not valid JSON ({e.msg} at column {e.colno})"
                continue
            yield number, obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
