"""Points in model text: formatting targets, parsing predictions, drawing them (docs/architecture.md#8-points).

Molmo writes points as percentages of the image width/height with one decimal, x first:
    <point x="12.3" y="45.6" alt="mug">mug</point>
    <points x1="12.3" y1="45.6" x2="50.0" y2="7.5" alt="mug">mug</points>
Counting answers wrap the element: "Counting the <points ...>mug</points> shows a total of 2.",
and an empty answer is "There are none.".

Parsing never raises on model output: truncated generations, garbage, values > 100 or NaN give the
points that could be recovered, `valid_format=False` when the whole answer is not one of the accepted
forms, and `dropped` counting coordinate pairs that were seen but could not be used.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

NONE_ANSWER = "There are none."

_NUM = r"\d+(?:\.\d+)?"
# Opening tag of a <point> / <points> element; `$` lets a tag cut off by truncation still match.
_OPEN_TAG = re.compile(r"<(points?)\b([^<>]*)(>|$)")
_CLOSE_TAG = re.compile(r"</points?\s*>")
# One coordinate attribute inside a tag; group 4 is the closing quote, empty when truncated.
_COORD_ATTR = re.compile(r"\b([xy])(\d*)\s*=\s*\"([^\"]*)(\"?)")
_ALT_ATTR = re.compile(r"\balt\s*=\s*\"([^\"]*)\"?")
# Forms outside tags (docs/architecture.md#point-parsing): Click(x, y) / (x, y) with one decimal, bare x="" y="" pairs,
# and the legacy three-digit "p=123,456" / "1=123,456" forms (value / 10).
_PAREN_PAIR = re.compile(r"(?:Click)?\(\s*(\d+\.\d)\s*,\s*(\d+\.\d)\s*\)")
_BARE_ATTR_PAIR = re.compile(rf"\bx(\d*)\s*=\s*\"({_NUM})\"\s+y\1\s*=\s*\"({_NUM})\"")
_LEGACY_PAIR = re.compile(r"(?<![\w.])(?:p|\d+)\s*=\s*(\d{3})\s*,\s*(\d{3})(?!\d)")

# Whole-answer forms accepted by the format validator (docs/architecture.md#point-parsing).
_ONE_POINT = re.compile(
    rf"<point\s+x\s*=\s*\"{_NUM}\"\s+y\s*=\s*\"{_NUM}\"(?:\s+alt\s*=\s*\"[^\"]*\")?\s*>[^<]*</point>")
_MANY_POINTS = re.compile(
    rf"<points(?:\s+x\d+\s*=\s*\"{_NUM}\"\s+y\d+\s*=\s*\"{_NUM}\")+(?:\s+alt\s*=\s*\"[^\"]*\")?\s*>[^<]*</points>")
_PAREN_LINE = re.compile(r"\(\s*\d+\.\d\s*,\s*\d+\.\d\s*\)")
_LEGACY_ONLY = re.compile(r"(?:(?:p|\d+)\s*=\s*\d{3}\s*,\s*\d{3}[\s;,]*)+")


@dataclasses.dataclass
class ParsedPoints:
    """Points recovered from one generated text.

    points: float64 [N, 2] (x, y) in pixels of the original image, in order of appearance.
    alts / texts: per point, the `alt` attribute and the element text of the enclosing
        <point(s)> element (None for points written in other forms).
    valid_format: the whole answer is exactly one accepted form (docs/architecture.md#point-parsing): one complete <point>,
        one complete <points>, lines of "(x, y)", or legacy three-digit pairs.
    dropped: coordinate pairs that were seen but not usable (value > 100, NaN, unpaired x/y, cut off).
    """
    points: np.ndarray
    alts: list[str | None]
    texts: list[str | None]
    valid_format: bool
    dropped: int = 0

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])


# ----------------------------------------------------------------------------------------------
# Formatting (generation targets)

def pixels_to_percent(points_px: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel (x, y) -> percent of width/height, as the original: x / (W / 100), y / (H / 100)."""
    pts = np.asarray(points_px, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"pixels_to_percent: points must have shape [N, 2], got {pts.shape}")
    if width <= 0 or height <= 0:
        raise ValueError(f"pixels_to_percent: image size must be positive, got {width}x{height}")
    return pts / np.array([width / 100.0, height / 100.0])


def percent_to_pixels(points_percent: np.ndarray, width: int, height: int) -> np.ndarray:
    """Percent -> pixels as the evaluation does (x / 100 * W, y / 100 * H)."""
    pts = np.asarray(points_percent, dtype=np.float64).reshape(-1, 2)
    return pts / 100.0 * np.array([width, height], dtype=np.float64)


def points_to_text(points_percent: np.ndarray, alt: str, text: str) -> str:
    """Format N >= 1 percent points as a <point> or <points> element (docs/architecture.md#point-format).

    Values are rounded to one decimal first and then sorted by x * 10000 + y, as the original does.
    They are not clipped to [0, 100] (the original does not either); NaN/inf raise ValueError.
    """
    pts = np.asarray(points_percent, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise ValueError(f"points_to_text: need points of shape [N>=1, 2], got {pts.shape}; "
                         f"an empty answer is {NONE_ANSWER!r}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("points_to_text: points contain NaN or inf")
    # `+ 0.0` turns -0.0 into 0.0 so no "-0.0" is ever written.
    rounded = [(round(float(x), 1) + 0.0, round(float(y), 1) + 0.0) for x, y in pts]
    rounded.sort(key=lambda p: p[0] * 10000 + p[1])
    if len(rounded) == 1:
        x, y = rounded[0]
        return f'<point x="{x:.1f}" y="{y:.1f}" alt="{alt}">{text}</point>'
    coords = " ".join(f'x{i}="{x:.1f}" y{i}="{y:.1f}"' for i, (x, y) in enumerate(rounded, start=1))
    return f'<points {coords} alt="{alt}">{text}</points>'


# ----------------------------------------------------------------------------------------------
# Parsing (evaluation)

def _to_percent(value: str) -> float | None:
    """A coordinate string as a usable percent value, or None (not a number, NaN, outside 0..100)."""
    try:
        v = float(value)
    except ValueError:
        return None
    if not math.isfinite(v) or v < 0.0 or v > 100.0:
        return None
    return v


def _pairs_in_tag(attrs: str) -> tuple[list[tuple[float, float]], int]:
    """Coordinate pairs of one tag's attribute string, ordered by index, and the unusable count."""
    attrs = _ALT_ATTR.sub(" ", attrs)  # an alt text like "x=1" must not look like a coordinate
    xs: dict[str, str | None] = {}
    ys: dict[str, str | None] = {}
    order: list[str] = []
    for axis, index, value, closed in _COORD_ATTR.findall(attrs):
        if index not in order:
            order.append(index)
        (xs if axis == "x" else ys)[index] = value if closed else None
    pairs, dropped = [], 0
    for index in order:
        x = _to_percent(xs[index]) if xs.get(index) is not None else None
        y = _to_percent(ys[index]) if ys.get(index) is not None else None
        if x is None or y is None:
            dropped += 1
        else:
            pairs.append((x, y))
    return pairs, dropped


def is_valid_point_format(text: str) -> bool:
    """Whether the whole answer is one accepted point form (docs/architecture.md#point-parsing)."""
    t = text.strip()
    if _ONE_POINT.fullmatch(t) or _MANY_POINTS.fullmatch(t) or _LEGACY_ONLY.fullmatch(t):
        return True
    lines = [line.strip() for line in t.splitlines() if line.strip()]
    return bool(lines) and all(_PAREN_LINE.fullmatch(line) for line in lines)


def parse_points(text: str, width: int, height: int) -> ParsedPoints:
    """Recover every point written in `text` (percent forms) as pixels of a `width` x `height` image."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    percent: list[tuple[float, float]] = []
    alts: list[str | None] = []
    texts: list[str | None] = []
    dropped = 0
    outside: list[str] = []  # text outside point elements, scanned for the other forms below
    pos = 0
    while True:
        m = _OPEN_TAG.search(text, pos)
        if m is None:
            outside.append(text[pos:])
            break
        outside.append(text[pos:m.start()])
        pairs, n_bad = _pairs_in_tag(m.group(2))
        alt_match = _ALT_ATTR.search(m.group(2))
        alt = alt_match.group(1) if alt_match else None
        # Element text runs to the closing tag, or (truncated) to the next opening tag / the end.
        close = _CLOSE_TAG.search(text, m.end())
        next_open = _OPEN_TAG.search(text, m.end())
        if close is not None and (next_open is None or close.start() < next_open.start()):
            body, pos = text[m.end():close.start()], close.end()
        else:
            end = next_open.start() if next_open is not None else len(text)
            body, pos = text[m.end():end], end
        percent.extend(pairs)
        alts.extend([alt] * len(pairs))
        texts.extend([body if m.group(3) else None] * len(pairs))
        dropped += n_bad
        if pos >= len(text):
            break
    rest = " ".join(outside)
    found: list[tuple[int, float, float]] = []  # (position, x, y) so mixed forms keep their order
    for m in _PAREN_PAIR.finditer(rest):
        found.append((m.start(), m.group(1), m.group(2)))
    for m in _BARE_ATTR_PAIR.finditer(rest):
        found.append((m.start(), m.group(2), m.group(3)))
    for m in _LEGACY_PAIR.finditer(rest):
        found.append((m.start(), int(m.group(1)) / 10.0, int(m.group(2)) / 10.0))
    for _, xs, ys in sorted(found, key=lambda f: f[0]):
        x, y = _to_percent(str(xs)), _to_percent(str(ys))
        if x is None or y is None:
            dropped += 1
            continue
        percent.append((x, y))
        alts.append(None)
        texts.append(None)
    pixels = percent_to_pixels(np.array(percent, dtype=np.float64), width, height)
    return ParsedPoints(points=pixels, alts=alts, texts=texts,
                        valid_format=is_valid_point_format(text), dropped=dropped)


# ----------------------------------------------------------------------------------------------
# Counting answers

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_A_TOTAL_OF = re.compile(r"a total of (\d+)")
_NONE_WORD = re.compile(r"\bnone\b")


def parse_count(text: str, *, none_as_zero: bool = True, count_points: bool = True) -> int | None:
    """The count stated by a counting answer, or None when it cannot be read (docs/architecture.md#point-parsing).

    Rule of the original: lower-case, strip a trailing ".", take the last whitespace-separated
    token as an integer or a number word zero..twenty; else the N of "a total of N".
    Additions, both on by default:
      none_as_zero: "There are none." (the word "none") -> 0. The original intends this but its
          regex never fires, so it scores "There are none." as unparsable; pass False to reproduce.
      count_points: an answer that only points ("<points x1=.. >mug</points>", e.g. when the
          sentence around the element was cut off) counts its points. Not in the original.
    """
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    if t.endswith("."):
        t = t[:-1]
    tokens = t.split()
    if tokens:
        last = tokens[-1]
        if last.isdigit():
            return int(last)
        if last in _NUMBER_WORDS:
            return _NUMBER_WORDS[last]
    m = _A_TOTAL_OF.search(t)
    if m:
        return int(m.group(1))
    if count_points and _OPEN_TAG.search(text):
        parsed = parse_points(text, 100, 100)
        if parsed.num_points > 0:
            return parsed.num_points
    if none_as_zero and _NONE_WORD.search(t):
        return 0
    return None


# ----------------------------------------------------------------------------------------------
# Drawing

def _as_pil_image(image: Any):
    """The picture as the model saw it: files, bytes and PIL images are decoded by the loader the
    preprocessor uses (EXIF orientation applied, 16-bit scaled to 8), so drawn points land on the objects."""
    from PIL import Image

    from molmo_jax.preprocess.image_io import load_image  # a leaf module; imported here to keep points light
    arr = np.asarray(image) if not isinstance(image, (str, bytes, Image.Image)) and not hasattr(image, "__fspath__") else None
    if arr is None or arr.dtype == np.uint16:
        return Image.fromarray(load_image(image if arr is None else arr, max_pixels=None), mode="RGB")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"draw_points: image must be [H, W, 3] (or a PIL image / path), got {arr.shape}")
    return Image.fromarray(arr.astype(np.uint8)[..., :3], mode="RGB")


def draw_points(image: Any, points: np.ndarray | Sequence, out_path: str,
                true_points: np.ndarray | Sequence | None = None, *, radius: int | None = None,
                color: tuple[int, int, int] = (255, 0, 0),
                true_color: tuple[int, int, int] = (0, 200, 0),
                colors: Sequence[tuple[int, int, int]] | None = None) -> str:
    """Draw predicted points (filled circles) and optionally true points (rings) and save a PNG.

    `points` and `true_points` are pixel (x, y) arrays [N, 2]; `colors` gives each point its own
    colour (default: all `color`). The radius defaults to 1% of the image diagonal (at least 3 px).
    Returns `out_path`.
    """
    from PIL import ImageDraw
    img = _as_pil_image(image).copy()
    w, h = img.size
    r = radius if radius is not None else max(3, int(round(0.01 * math.hypot(w, h))))
    draw = ImageDraw.Draw(img)
    for x, y in np.asarray(true_points if true_points is not None else [], dtype=np.float64).reshape(-1, 2):
        draw.ellipse([x - r - 2, y - r - 2, x + r + 2, y + r + 2], outline=true_color, width=max(2, r // 2))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if colors is not None and len(colors) != len(pts):
        raise ValueError(f"draw_points: {len(colors)} colors for {len(pts)} points")
    for k, (x, y) in enumerate(pts):
        fill = tuple(colors[k]) if colors is not None else color
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
    img.save(out_path, format="PNG")
    return str(out_path)
