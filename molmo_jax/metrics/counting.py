"""Counting accuracy (CountBenchQA, PixMo-Count; docs/architecture.md#point-parsing, #metrics).

Reported: `accuracy` (exact, the headline number), `close` (|pred - gt| <= 1), `valid` (parsable),
`per_count` accuracy for each ground-truth count and `per_count_mean`, their unweighted mean.

`original_quirks=True` parses as the original snapshot does: "There are none." is unparsable (the
intended none -> 0 rule never fires there) and an answer made only of points is not counted.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from molmo_jax.molmo2_points import pointed_count
from molmo_jax.points import parse_count


def count_scores(prediction: str, gt_count: int, *, original_quirks: bool = False) -> dict:
    """{"pred_count", "valid", "correct", "close"} for one answer."""
    pred = parse_count(prediction, none_as_zero=not original_quirks, count_points=not original_quirks)
    if pred is None and not original_quirks:  # a Molmo2 answer that only points: its distinct objects
        pred = pointed_count(prediction)
    gt = int(gt_count)
    valid = pred is not None
    return dict(pred_count=pred, valid=valid, correct=valid and pred == gt,
                close=valid and abs(pred - gt) <= 1)


def counting_metrics(predictions: Iterable[str], gt_counts: Iterable[int], *,
                     original_quirks: bool = False) -> dict:
    """Aggregate counting metrics over examples."""
    predictions, gt_counts = list(predictions), [int(c) for c in gt_counts]
    if len(predictions) != len(gt_counts):
        raise ValueError(f"{len(predictions)} predictions but {len(gt_counts)} ground-truth counts")
    if not predictions:
        raise ValueError("no examples to score")
    per_count: dict[int, list[bool]] = defaultdict(list)
    totals = dict(correct=0, close=0, valid=0)
    for pred, gt in zip(predictions, gt_counts):
        s = count_scores(pred, gt, original_quirks=original_quirks)
        for key in totals:
            totals[key] += int(s[key])
        per_count[gt].append(s["correct"])
    n = len(predictions)
    by_count = {k: sum(v) / len(v) for k, v in sorted(per_count.items())}
    return dict(accuracy=totals["correct"] / n, close=totals["close"] / n, valid=totals["valid"] / n,
                per_count=by_count, per_count_mean=sum(by_count.values()) / len(by_count), n=n)
