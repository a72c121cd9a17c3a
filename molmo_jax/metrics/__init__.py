"""Molmo's evaluation metrics (docs/architecture.md#metrics).

pointing      precision / recall / F1 with Hungarian matching and mask or distance hits
counting      exact / close / valid accuracy and per-count accuracy
text_answers  VQA soft accuracy, ANLS, relaxed accuracy, exact match, multiple choice,
              and the answer post-processing of 15.2
clocks        clock-reading accuracy
loss          validation loss and perplexity from summed token losses
"""
from molmo_jax.metrics.clocks import clock_accuracy, parse_clock_time
from molmo_jax.metrics.counting import count_scores, counting_metrics
from molmo_jax.metrics.loss import LossAccumulator, loss_and_perplexity, token_loss_sum
from molmo_jax.metrics.pointing import decode_rle, pointing_metrics, pointing_scores
from molmo_jax.metrics.text_answers import (anls, edit_distance, exact_match, multiple_choice_accuracy,
                                            normalize_vqa_answer, postprocess_answer, relaxed_accuracy,
                                            select_option, vqa_accuracy)

__all__ = [
    "LossAccumulator", "anls", "clock_accuracy", "count_scores", "counting_metrics", "decode_rle",
    "edit_distance", "exact_match", "loss_and_perplexity", "multiple_choice_accuracy",
    "normalize_vqa_answer", "parse_clock_time", "pointing_metrics", "pointing_scores",
    "postprocess_answer", "relaxed_accuracy", "select_option", "token_loss_sum", "vqa_accuracy",
]
