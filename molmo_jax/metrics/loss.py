"""Caption / language-model loss and perplexity on a validation split.

The evaluation sums token losses and loss weights over batches and divides once at the end, so the
mean is per weighted token over the whole split (not a mean of per-batch means, which would
over-weight short batches). Perplexity is exp(mean loss).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def token_loss_sum(logits, target_tokens, loss_masks) -> tuple[float, float]:
    """Summed weighted cross-entropy and summed weight for one batch.

    logits [B, T, V]; target_tokens [B, T] (-1 = padding); loss_masks [B, T] weights.
    Targets are already aligned with the inputs (docs/architecture.md#sequence-assembly): logits[t] is scored against
    target_tokens[t], with no extra shift.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(target_tokens)
    weights = np.asarray(loss_masks, dtype=np.float64)
    if logits.shape[:2] != targets.shape or targets.shape != weights.shape:
        raise ValueError(f"token_loss_sum: shapes do not agree: logits {logits.shape}, "
                         f"target_tokens {targets.shape}, loss_masks {weights.shape}")
    valid = (targets >= 0) & (weights > 0)
    safe_targets = np.where(valid, targets, 0)
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    target_logit = np.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    w = np.where(valid, weights, 0.0)
    return float((nll * w).sum()), float(w.sum())


@dataclasses.dataclass
class LossAccumulator:
    """Running sums of weighted token loss and weight; `result()` gives loss and perplexity."""
    loss_sum: float = 0.0
    weight_sum: float = 0.0

    def add(self, loss_sum: float, weight_sum: float) -> None:
        if weight_sum < 0 or not math.isfinite(loss_sum):
            raise ValueError(f"bad batch loss: loss_sum={loss_sum}, weight_sum={weight_sum}")
        self.loss_sum += float(loss_sum)
        self.weight_sum += float(weight_sum)

    def result(self) -> dict:
        return loss_and_perplexity(self.loss_sum, self.weight_sum)


def loss_and_perplexity(loss_sum: float, weight_sum: float) -> dict:
    """{"loss": loss_sum / weight_sum, "perplexity": exp(loss), "tokens": weight_sum}."""
    if weight_sum <= 0:
        raise ValueError("no loss weight: nothing was scored (empty split or all-zero loss masks)")
    loss = loss_sum / weight_sum
    # exp overflows above ~709; an untrained model can get there, so report inf rather than raise.
    perplexity = math.exp(loss) if loss < 700 else float("inf")
    return dict(loss=loss, perplexity=perplexity, tokens=weight_sum)
