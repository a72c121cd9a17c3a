"""Molmo2's points and tracks in answers: parsing to pixels and frame times, writing, drawing
(docs/architecture.md#molmo2-points).

Molmo2 writes one element per answer part, coordinates in thousandths of the image width / height:
    <points coords="1 1 073 160 2 173 600" alt="boats">boats</points>          one image: frame "1"
    <points coords="1 1 500 250;2 1 310 700">boats</points>                    image 1 and image 2
    <tracks coords="0.0 1 500 250 2 120 300;0.5 1 510 260">players</tracks>    video: frame times in seconds
A frame group is "FRAME ID X Y ID X Y ...", groups separated by ";" (or a tab, ":" or ","); an object keeps
its ID across frames, so tracking follows an ID and counting reads the largest one. The format and the
parsing rules (regular expressions, x / 1000 * width, points outside the image dropped) follow the Molmo2
model cards' `extract_video_points` / `extract_multi_image_points`; here the `coords` and `alt` attributes
may come in any order and an element cut off by the end of generation still yields its complete points.
Counting answers ("Counting the <points ...>boats</points> shows a total of 5.") are read by
`molmo_jax.points.parse_count`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import numpy as np

from molmo_jax.points import ParsedPoints, draw_points, parse_points

_ELEMENT = re.compile(r"<(points|tracks)\b([^<>]*?)(/?)(>|$)")
_COORDS = re.compile(r"\bcoords\s*=\s*\"([^\"]*)\"?")
_ALT = re.compile(r"\balt\s*=\s*\"([^\"]*)\"?")
_FRAME = re.compile(r"(?:^|\t|:|,|;)([0-9.]+) ([0-9. ]+)")
_POINT = re.compile(r"([0-9]+) ([0-9]{3,4}) ([0-9]{3,4})")
_HAS_COORDS = re.compile(r"<(?:points|tracks)\b[^<>]*\bcoords\s*=")
_ONE_ELEMENT = re.compile(r"<(points|tracks)\b[^<>]*\bcoords\s*=\s*\"[^\"]*\"[^<>]*>[^<]*</\1>")
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


@dataclasses.dataclass
class Molmo2Points:
    """Points of one answer, in order of appearance.

    points: float64 [N, 2] (x, y) pixels of their image / frame;  frames: float64 [N], the image number
    (1-based) or the video time in seconds;  ids: int64 [N] object ids;  kinds: "points" or "tracks" and
    alts / texts: the element's alt attribute and text (None when absent), per point;  dropped: triples seen
    but unusable (outside the image, an image number with no size).
    """
    points: np.ndarray
    frames: np.ndarray
    ids: np.ndarray
    kinds: list[str]
    alts: list[str | None]
    texts: list[str | None]
    dropped: int = 0

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def count(self) -> int:
        """Distinct objects (ids) pointed at or tracked."""
        return int(np.unique(self.ids).size)


def _frame_size(frame: float, width, height) -> tuple[float, float] | None:
    """(width, height) of the image a frame refers to: the one size, or per image for several images."""
    if np.ndim(width) == 0:
        return float(width), float(height)
    k = int(frame)
    if k != frame or not 1 <= k <= len(width):
        return None
    return float(width[k - 1]), float(height[k - 1])


def parse_molmo2_points(text: str, width, height) -> Molmo2Points:
    """Every point of `<points>` / `<tracks>` elements in `text`, in pixels. `width` / `height` are the image
    (or video frame) size, or sequences of sizes for several images (frame k is image k, 1-based).
    Never raises on model output."""
    if np.ndim(width) != np.ndim(height) or np.ndim(width) > 1 or (np.ndim(width) and len(width) != len(height)):
        raise ValueError("parse_molmo2_points: width and height must both be numbers or sequences of one length")
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    pts, frames, ids, kinds, alts, texts, dropped = [], [], [], [], [], [], 0
    pos = 0
    while (m := _ELEMENT.search(text, pos)) is not None:
        kind, attrs = m.group(1), m.group(2)
        body, pos = None, m.end()
        if m.group(4) and not m.group(3):  # a complete opening tag: the text runs to its closing tag
            close = text.find(f"</{kind}>", m.end())
            nxt = _ELEMENT.search(text, m.end())
            end = close if close >= 0 and (nxt is None or close < nxt.start()) else (nxt.start() if nxt else len(text))
            body, pos = text[m.end():end], (close + len(kind) + 3 if end == close else end)
        coords = _COORDS.search(attrs)
        alt = _ALT.search(_COORDS.sub(" ", attrs))
        for group in _FRAME.finditer(coords.group(1) if coords else ""):
            try:
                frame = float(group.group(1))
            except ValueError:  # "1.2.3"
                frame = None
            size = _frame_size(frame, width, height) if frame is not None else None
            for oid, x, y in _POINT.findall(group.group(2)):
                if size is None:
                    dropped += 1
                    continue
                px, py = float(x) / 1000 * size[0], float(y) / 1000 * size[1]
                if not (0 <= px <= size[0] and 0 <= py <= size[1]):
                    dropped += 1
                    continue
                pts.append((px, py))
                frames.append(frame)
                ids.append(int(oid))
                kinds.append(kind)
                alts.append(alt.group(1) if alt else None)
                texts.append(body)
    return Molmo2Points(points=np.array(pts, np.float64).reshape(-1, 2), frames=np.array(frames, np.float64),
                        ids=np.array(ids, np.int64), kinds=kinds, alts=alts, texts=texts, dropped=dropped)


def is_molmo2_answer(text) -> bool:
    """Whether an answer holds Molmo2's `<points coords=...>` / `<tracks coords=...>` elements."""
    return isinstance(text, str) and _HAS_COORDS.search(text) is not None


def answer_points(text, width: int, height: int) -> ParsedPoints:
    """The points of one image's answer from either family, in pixels: Molmo2's elements when the answer
    has them, else Molmo's forms (`points.parse_points`). `valid_format` is True for an answer that is
    exactly one complete Molmo2 element, as it is for exactly one Molmo form."""
    if not is_molmo2_answer(text):
        return parse_points(text, width, height)
    p = parse_molmo2_points(text, width, height)
    return ParsedPoints(points=p.points, alts=p.alts, texts=p.texts,
                        valid_format=_ONE_ELEMENT.fullmatch(text.strip()) is not None, dropped=p.dropped)


def pointed_count(text) -> int | None:
    """Distinct objects a Molmo2 answer points at, or None when it points at none."""
    if not is_molmo2_answer(text):
        return None
    p = parse_molmo2_points(text, 1000, 1000)  # coordinates are thousandths: the size does not matter
    return p.count if p.num_points else None


def molmo2_points_to_text(frames, ids, points, width, height, alt: str | None = None, text: str = "",
                          tag: str = "points", time_format: str | None = None) -> str:
    """One element with pixel `points` [N, 2] of objects `ids` [N] on `frames` [N] (image numbers, or
    seconds with time_format, e.g. ".1f"), in thousandths of `width` / `height`, grouped by frame in order
    of first appearance."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if tag not in ("points", "tracks") or len(frames) != len(pts) or len(ids) != len(pts) or not len(pts):
        raise ValueError(f"molmo2_points_to_text: need tag points|tracks and N >= 1 frames, ids and points "
                         f"of one length, got {tag!r}, {len(frames)}, {len(ids)}, {len(pts)}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("molmo2_points_to_text: points contain NaN or inf")
    groups: dict[str, list[str]] = {}
    for f, oid, (x, y) in zip(frames, ids, pts):
        key = format(float(f), time_format) if time_format else str(int(f))
        groups.setdefault(key, []).append(f"{int(oid)} {round(x / width * 1000):03d} {round(y / height * 1000):03d}")
    coords = ";".join(f"{key} {' '.join(items)}" for key, items in groups.items())
    alt_attr = f' alt="{alt}"' if alt is not None else ""
    return f'<{tag} coords="{coords}"{alt_attr}>{text}</{tag}>'


def nearest_frames(times, timestamps) -> np.ndarray:
    """Index of the frame whose timestamp is closest to each time (the earlier frame on a tie)."""
    stamps = np.asarray(timestamps, np.float64)
    if stamps.size == 0:
        raise ValueError("nearest_frames: no frame timestamps")
    return np.abs(np.asarray(times, np.float64)[:, None] - stamps[None, :]).argmin(axis=1)


def draw_molmo2_points(images, parsed: Molmo2Points, out_dir: str, timestamps=None, prefix: str = "points",
                       radius: int | None = None) -> list[str]:
    """Draw each point on its image (frame k -> images[k - 1]) or, with `timestamps` (one per frame of a
    video), on the frame nearest its time, one colour per object id; writes `{prefix}_{index:03d}.png` in
    out_dir for every image or frame with points and returns those paths."""
    images = list(images) if isinstance(images, (list, tuple)) or getattr(images, "ndim", 3) == 4 else [images]
    if timestamps is not None:
        if len(timestamps) != len(images):
            raise ValueError(f"draw_molmo2_points: {len(timestamps)} timestamps for {len(images)} frames")
        where = nearest_frames(parsed.frames, timestamps) if parsed.num_points else np.zeros(0, np.int64)
    else:
        where = parsed.frames.astype(np.int64) - 1
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for index in sorted(set(int(w) for w in where if 0 <= w < len(images))):
        sel = where == index
        colors = [PALETTE[(int(i) - 1) % len(PALETTE)] for i in parsed.ids[sel]]
        path = os.path.join(out_dir, f"{prefix}_{index:03d}.png")
        paths.append(draw_points(images[index], parsed.points[sel], path, radius=radius, colors=colors))
    return paths
