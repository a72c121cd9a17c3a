"""What a person sees during training: a progress bar, metrics.jsonl and TensorBoard event files."""
from __future__ import annotations

import json
import os
import sys
import time

from tqdm import tqdm


class MetricsWriter:
    """One JSON object per logged step in WORKDIR/metrics.jsonl, the same scalars as TensorBoard
    events in WORKDIR/tensorboard/ (tensorboardX: no TensorFlow needed). Only process 0 writes."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if prefix != "train":
            row = {"step": int(step), **{f"{prefix}/{k}": v for k, v in row.items() if k != "step"}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k if "/" in k else f"{prefix}/{k}", v, int(step))

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _scalar(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if isinstance(v, int) else f


class Progress:
    """A tqdm bar over steps with the latest loss, learning rate, tokens/s and MFU."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                        file=sys.stderr, unit="step", smoothing=0.1)
        self.last = time.perf_counter()

    def update(self, n: int, metrics: dict | None = None):
        self.bar.update(n)
        if metrics:
            show = {"loss": f"{metrics['loss']:.4f}"}
            if "lr/llm" in metrics:
                show["lr"] = f"{metrics['lr/llm']:.2e}"
            if "tokens_per_s" in metrics:
                show["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            if "mfu" in metrics:
                show["mfu"] = f"{100 * metrics['mfu']:.1f}%"
            self.bar.set_postfix(show, refresh=False)

    def close(self):
        self.bar.close()
