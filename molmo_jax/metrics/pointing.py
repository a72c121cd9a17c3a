"""Pointing precision / recall / F1 (docs/architecture.md#metrics).

Per example:
1. Parse the predicted points into pixels (Molmo's forms, or Molmo2's `<points coords>` elements:
   molmo_jax.molmo2_points.answer_points).
2. No ground-truth points: P = R = F1 = 1 when nothing is predicted, else 0.
3. The whole answer is not an accepted point format (or no usable point was recovered): 0.
4. Otherwise match predictions to ground-truth objects with a minimum-cost assignment (Hungarian)
   on Euclidean distance. A matched pair is a hit when
   - masks are given: the predicted point, rounded to the nearest integer pixel and inside the
     image, lies in the matched object's mask (a box or a segmentation);
   - no masks: the predicted point lies within `distance_threshold` pixels of the matched point,
     by default 5% of the image diagonal (DEFAULT_DISTANCE_FRACTION; the demo's bar "within 5% of
     the image size of a true point", measured on the diagonal so it does not depend on which
     side is longer).
   P = hits / #predicted, R = hits / #ground truth, F1 = 2PR / (P + R) (0 when P or R is 0).
Scores are averaged over examples.

Units: the correct assignment compares pixels with pixels. The original passes ground-truth points
in the dataset's own scale (percent for PixMo-Points-Eval) next to predictions in pixels, so its
assignment pairs points by a meaningless distance (the hit test itself uses pixel masks and is
right). `original_units=True` reproduces that: the ground truth is converted to percent before the
assignment, hits are still tested in pixels. With several points per object the two rules can pair
different points and so give different hit counts; with one point, or when every prediction lands
on a distinct object whichever way they are paired, they agree.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from molmo_jax.molmo2_points import answer_points
from molmo_jax.points import pixels_to_percent

DEFAULT_DISTANCE_FRACTION = 0.05


# ----------------------------------------------------------------------------------------------
# Object regions: [x, y, w, h] boxes, COCO uncompressed RLE, or boolean [H, W] arrays

def decode_rle(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE {"size": [h, w], "counts": [...]} -> bool [h, w].

    Counts alternate runs of 0s and 1s, starting with 0s, over the pixels in column-major order.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE mask must be a dict with 'size' [h, w] and 'counts'")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        raise ValueError("compressed (string) RLE counts are not supported; give uncompressed counts")
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or np.any(counts < 0) or counts.sum() != h * w:
        raise ValueError(f"RLE counts must be non-negative run lengths summing to h*w = {h * w}, "
                         f"got sum {int(counts.sum()) if counts.ndim == 1 else 'n/a'}")
    values = np.arange(len(counts)) % 2 == 1  # odd runs are the 1s
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T


def _region(mask: Any, width: int, height: int):
    """One object's region as a function (px, py) -> bool on integer pixels inside the image."""
    if isinstance(mask, dict):
        grid = decode_rle(mask)
    elif isinstance(mask, (list, tuple)) and len(mask) == 4 and all(isinstance(v, (int, float)) for v in mask):
        x0, y0, bw, bh = (float(v) for v in mask)
        # A box covers the integer pixels x0 <= px < x0 + w (so [0, 0, W, H] is the whole image).
        return lambda px, py: x0 <= px < x0 + bw and y0 <= py < y0 + bh
    else:
        grid = np.asarray(mask)
        if grid.ndim != 2:
            raise ValueError(f"a mask must be an [x, y, w, h] box, an RLE dict or a 2-D array, "
                             f"got shape {grid.shape}")
        grid = grid.astype(bool)
    if grid.shape != (height, width):
        raise ValueError(f"mask size {grid.shape[1]}x{grid.shape[0]} (w x h) does not match the image "
                         f"size {width}x{height}")
    return lambda px, py: bool(grid[py, px])


def object_regions(masks: Any, n_objects: int, width: int, height: int) -> list:
    """Per-object regions; one region is accepted as the only object's mask."""
    if isinstance(masks, dict) or (isinstance(masks, (list, tuple)) and len(masks) == 4
                                   and all(isinstance(v, (int, float)) for v in masks)):
        masks = [masks]
    elif isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    masks = list(masks)
    if len(masks) != n_objects:
        raise ValueError(f"got {len(masks)} masks for {n_objects} ground-truth points; "
                         f"need one mask per point")
    return [_region(m, width, height) for m in masks]


# ----------------------------------------------------------------------------------------------
# Scores

def _prf(hits: int, n_pred: int, n_gt: int) -> tuple[float, float, float]:
    p = hits / n_pred if n_pred else 0.0
    r = hits / n_gt if n_gt else 0.0
    f1 = 2 * p * r / (p + r) if p > 0 and r > 0 else 0.0
    return p, r, f1


def pointing_scores(prediction: str, gt_points: np.ndarray | Sequence, width: int, height: int,
                    masks: Any = None, *, original_units: bool = False,
                    distance_threshold: float | None = None) -> dict:
    """Precision, recall and F1 of one prediction against ground-truth points in pixels.

    masks: None, or one region per ground-truth point ([x, y, w, h] box, RLE dict or bool [H, W]).
    distance_threshold: pixels, used only without masks; default 5% of the image diagonal.
    Returns {"precision", "recall", "f1", "hits", "n_pred", "n_gt", "valid_format"}.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    gt = np.asarray(gt_points, dtype=np.float64).reshape(-1, 2) if len(gt_points) else np.zeros((0, 2))
    parsed = answer_points(prediction, width, height)
    pred = parsed.points
    result = dict(hits=0, n_pred=parsed.num_points, n_gt=int(gt.shape[0]), valid_format=parsed.valid_format)

    def done(p, r, f1):
        return dict(precision=p, recall=r, f1=f1, **result)

    if gt.shape[0] == 0:
        score = 1.0 if parsed.num_points == 0 else 0.0
        return done(score, score, score)
    # Masks are checked before the prediction, so bad ground truth is reported whatever was predicted.
    regions = object_regions(masks, gt.shape[0], width, height) if masks is not None else None
    if not parsed.valid_format or parsed.num_points == 0:
        return done(0.0, 0.0, 0.0)

    gt_for_assignment = pixels_to_percent(gt, width, height) if original_units else gt
    cost = np.linalg.norm(pred[:, None, :] - gt_for_assignment[None, :, :], axis=-1)
    pred_idx, gt_idx = linear_sum_assignment(cost)

    threshold = (DEFAULT_DISTANCE_FRACTION * math.hypot(width, height)
                 if distance_threshold is None else float(distance_threshold))
    hits = 0
    for i, j in zip(pred_idx, gt_idx):
        if regions is not None:
            px, py = int(np.rint(pred[i, 0])), int(np.rint(pred[i, 1]))
            hits += int(0 <= px < width and 0 <= py < height and regions[j](px, py))
        else:
            hits += int(np.linalg.norm(pred[i] - gt[j]) <= threshold)
    result["hits"] = hits
    return done(*_prf(hits, parsed.num_points, gt.shape[0]))


def pointing_metrics(scores: Iterable[dict]) -> dict:
    """Average per-example pointing scores: precision, recall, f1, valid (format rate), n."""
    scores = list(scores)
    if not scores:
        raise ValueError("no examples to score")
    mean = lambda key: float(np.mean([float(s[key]) for s in scores]))  # noqa: E731
    return dict(precision=mean("precision"), recall=mean("recall"), f1=mean("f1"),
                valid=mean("valid_format"), n=len(scores))
