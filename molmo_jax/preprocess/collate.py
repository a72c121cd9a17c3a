"""Collator: a list of preprocessed examples -> one model batch with padding -1 (docs/architecture.md#batching).

To keep the number of jit compilations bounded, text is padded up to the smallest of a few fixed
sequence lengths (`seq_buckets`) and crops up to the smallest of a few crop counts
(`crop_buckets`), so a training or evaluation loop sees at most len(seq_buckets) *
len(crop_buckets) shapes. Text longer than the largest bucket is truncated, as the original's
collator does (the image block is never cut). Without buckets, the batch is padded to its own
longest example (the original's `pad=False`, what the golden inputs use).

Output (the model batch contract): input_ids, target_tokens, position_ids, subsegment_ids (only
if some example is packed) int32 [B, T]; loss_masks float32 [B, T]; images float32 [B, C, P, F];
image_masks float32 [B, C, P]; image_input_idx int32 [B, C, tokens_per_crop].
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from molmo_jax.preprocess.sequence import truncate_example

TEXT_DTYPES = {"input_ids": np.int32, "target_tokens": np.int32, "loss_masks": np.float32,
               "position_ids": np.int32, "subsegment_ids": np.int32}
IMAGE_DTYPES = {"images": np.float32, "image_masks": np.float32, "image_input_idx": np.int32}


def default_seq_buckets(max_len: int, smallest: int = 256) -> tuple[int, ...]:
    """Doublings from `smallest` below max_len, then max_len itself (e.g. 256, 512, 1024, 2048, 2304)."""
    out = []
    n = smallest
    while n < max_len:
        out.append(n)
        n *= 2
    out.append(max_len)
    return tuple(out)


def _bucket(n: int, buckets, what: str, allow_over: bool) -> int:
    for b in buckets:
        if n <= b:
            return b
    if allow_over:
        return buckets[-1]
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]} (buckets: {list(buckets)})")


class Collator:
    packs = True   # examples may hold several conversations (subsegment_ids)

    def __init__(self, seq_buckets: Sequence[int] | None = None, crop_buckets: Sequence[int] | None = None,
                 batch_size: int | None = None, include_metadata: bool = False):
        """seq_buckets / crop_buckets: allowed padded sizes (None: the batch's own maximum).
        batch_size: pad the batch with all -1 rows up to this size (static batch shape)."""
        self.seq_buckets = tuple(sorted(set(int(b) for b in seq_buckets))) if seq_buckets else None
        self.crop_buckets = tuple(sorted(set(int(b) for b in crop_buckets))) if crop_buckets else None
        self.batch_size = batch_size
        self.include_metadata = include_metadata

    @classmethod
    def from_config(cls, cfg, max_sequence_length: int, seq_buckets: Sequence[int] | None = None,
                    crop_buckets: Sequence[int] | None = None, max_crops: int | None = None, **kw) -> "Collator":
        """Buckets for a model config: sequence lengths `default_seq_buckets(max_sequence_length)`
        unless given, and one crop count, 1 + max_crops (the original's fixed 13, or 37 for 36-crop
        evaluation), unless given."""
        n_crops = 1 + (max_crops if max_crops is not None else cfg.image.max_crops)
        return cls(seq_buckets or default_seq_buckets(max_sequence_length), crop_buckets or (n_crops,), **kw)

    @property
    def max_sequence_length(self) -> int | None:
        return self.seq_buckets[-1] if self.seq_buckets else None

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows = self.batch_size or len(examples)
        if rows < len(examples):
            raise ValueError(f"{len(examples)} examples do not fit the batch size {rows}")
        for i, ex in enumerate(examples):
            missing = [k for k in ("input_ids", "target_tokens", "loss_masks") if k not in ex]
            if missing:
                raise ValueError(f"example {i} lacks {missing} (keys: {sorted(ex)})")
        if self.max_sequence_length:
            examples = [truncate_example(ex, self.max_sequence_length) for ex in examples]
        longest = max(len(ex["input_ids"]) for ex in examples)
        t = _bucket(longest, self.seq_buckets, "sequence length", True) if self.seq_buckets else longest

        out = {}
        packed = any("subsegment_ids" in ex for ex in examples)
        for key, dtype in TEXT_DTYPES.items():
            if key == "subsegment_ids" and not packed:
                continue
            arr = np.full((rows, t), -1, dtype)
            for i, ex in enumerate(examples):
                n = len(ex["input_ids"])
                if key in ex:
                    arr[i, :n] = ex[key]
                elif key == "subsegment_ids":
                    arr[i, :n] = 1      # unpacked examples in a packed batch (docs/architecture.md#packing)
                elif key == "position_ids":
                    arr[i, :n] = np.arange(n)
            out[key] = arr

        with_images = [ex for ex in examples if ex.get("images") is not None]
        if with_images:
            most = max(len(ex["images"]) for ex in with_images)
            c = _bucket(most, self.crop_buckets, "crop count", False) if self.crop_buckets else most
            first = with_images[0]
            for key, dtype in IMAGE_DTYPES.items():
                arr = np.full((rows, c) + first[key].shape[1:], -1, dtype)
                for i, ex in enumerate(examples):
                    if ex.get("images") is not None:
                        if ex[key].shape[1:] != first[key].shape[1:]:
                            raise ValueError(f"example {i}: {key} has shape {ex[key].shape}, which does not "
                                             f"match {first[key].shape} of the other examples")
                        arr[i, :len(ex[key])] = ex[key]
                out[key] = arr
        if self.include_metadata:
            out["metadata"] = [ex.get("metadata", {}) for ex in examples] + [{}] * (rows - len(examples))
        return out
