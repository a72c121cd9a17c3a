"""The one table from evaluation task to metric: how one prediction is scored against its ground
truth, and how a task's scores are aggregated. Used by generation-based evaluation
(`molmo_jax.evaluate`) and by `python -m tools.eval score` (which checks the fields first).

Ground truth per task (the fields of a predictions file and of an example's metadata):
    pointing                        points [[x, y], ...] pixels, image_width, image_height, mask (optional)
    counting                        count
    vqa, vqa_plain, anls, relaxed,  answers [str, ...] (mc: also option indices; options optional)
    exact, mc, clock
"""
from __future__ import annotations

import dataclasses

import numpy as np

from molmo_jax.metrics.clocks import clock_accuracy
from molmo_jax.metrics.counting import count_scores, counting_metrics
from molmo_jax.metrics.pointing import pointing_metrics, pointing_scores
from molmo_jax.metrics.text_answers import (anls, exact_match, multiple_choice_accuracy, postprocess_answer,
                                            relaxed_accuracy, vqa_accuracy)

TASKS = ("pointing", "counting", "vqa", "vqa_plain", "anls", "relaxed", "exact", "mc", "clock")
# New tokens to generate per task: 192 for pointing and counting, 12 for short answers.
MAX_NEW_TOKENS = {task: 192 if task in ("pointing", "counting") else 12 for task in TASKS}


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    postprocess: bool = True                  # text tasks: the answer post-processing
    distance_threshold: float | None = None   # pointing: hit radius in pixels (None: masks if given,
    use_masks: bool = True                    # else 5% of the image diagonal); use_masks=False ignores masks
    original_units: bool = False              # pointing: match GT percent against predicted pixels
    original_quirks: bool = False             # counting: parse as the original


_TEXT = {
    "vqa": lambda a, gt: {"accuracy": vqa_accuracy(a, gt["answers"])},
    "vqa_plain": lambda a, gt: {"accuracy": vqa_accuracy(a, gt["answers"], normalize=False)},
    "anls": lambda a, gt: {"anls": anls(a, gt["answers"]), "exact_match": exact_match(a, gt["answers"])},
    "relaxed": lambda a, gt: {"accuracy": relaxed_accuracy(a, gt["answers"]),
                              "exact_match": exact_match(a, gt["answers"])},
    "exact": lambda a, gt: {"accuracy": exact_match(a, gt["answers"])},
    "mc": lambda a, gt: {"accuracy": multiple_choice_accuracy(a, gt["answers"], gt.get("options"))},
    "clock": lambda a, gt: {"accuracy": max(clock_accuracy(a, x) for x in gt["answers"])},
}


def score(task: str, prediction: str, truth: dict, settings: ScoreSettings = ScoreSettings()) -> dict:
    """Scores of one prediction. Raises ValueError for ground truth the metric cannot use."""
    if task == "pointing":
        masks = truth.get("mask") if settings.use_masks else None
        return pointing_scores(prediction, truth["points"], int(truth["image_width"]), int(truth["image_height"]),
                               masks, original_units=settings.original_units,
                               distance_threshold=settings.distance_threshold)
    if task == "counting":
        return count_scores(prediction, int(truth["count"]), original_quirks=settings.original_quirks)
    if task not in _TEXT:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return _TEXT[task](postprocess_answer(prediction) if settings.postprocess else prediction, truth)


def aggregate(task: str, scores: list[dict], predictions: list[str], truths: list[dict],
              settings: ScoreSettings = ScoreSettings()) -> dict:
    """A task's metrics over its examples (with `n`)."""
    if not scores:
        return {"n": 0}
    if task == "pointing":
        return pointing_metrics(scores)
    if task == "counting":
        counts = [int(t["count"]) for t in truths]
        return dict(counting_metrics(predictions, counts, original_quirks=settings.original_quirks), n=len(scores))
    return {**{key: float(np.mean([s[key] for s in scores])) for key in scores[0]}, "n": len(scores)}
