"""Token sequence of one example: messages + image blocks -> model arrays
(docs/architecture.md#sequence-assembly, #packing).

Layout: [BOS] + image block(s) + text, where each image block goes right after its `<|image|>`
marker or, without markers, at the start. Training format: input = sequence[:-1], targets =
sequence[1:] (already aligned with the inputs); inference format: input = sequence, targets =
sequence[1:] + [-1]. Several conversations about one image are packed into one sequence that
shares the image tokens (subsegment ids, restarted position ids, sqrt(1/N) loss weights).
"""
from __future__ import annotations

import math

import numpy as np

from molmo_jax.preprocess.image import ImageInputs

IMAGE_SUBSEGMENT = 10000  # subsegment id of BOS and image tokens in packed examples (docs/architecture.md#packing)
TEXT_KEYS = ("input_ids", "target_tokens", "loss_masks", "position_ids", "subsegment_ids")


class SequenceError(ValueError):
    """An example whose tokens cannot be assembled (marker/image mismatch, too long, ...)."""


def tokenize_messages(tokenizer, messages: list[str], weight: float = 1.0):
    """(tokens int32, loss mask float32): messages encoded one by one; every assistant message
    (odd index) gets EOS appended and carries loss `weight`, user messages carry 0."""
    ids, mask = [], []
    for k, msg in enumerate(messages):
        t = tokenizer.encode(msg)
        if k % 2 == 1:
            t = t + [tokenizer.eos_id]
        ids.extend(t)
        mask.extend([weight if k % 2 == 1 else 0.0] * len(t))
    return np.array(ids, np.int32), np.array(mask, np.float32)


def packed_position_ids(subsegments: np.ndarray) -> np.ndarray:
    """Position of token i = #(tokens j <= i with subsegment[j] >= subsegment[i]) - 1, so every
    conversation continues after the image tokens as if it were alone (docs/architecture.md#packing)."""
    pos = np.empty(subsegments.shape, np.int32)
    for s in np.unique(subsegments):
        here = subsegments == s
        pos[here] = (np.cumsum(subsegments >= s) - 1)[here]
    return pos


def assemble(conversations, images: list[ImageInputs], *, bos_id: int, image_prompt_id: int,
             for_inference: bool, root_subsegments: bool = True) -> dict:
    """Model arrays of one example.

    conversations: [(tokens, loss_mask), ...] from `tokenize_messages`, one per conversation.
    images: processed images, inserted at `<|image|>` markers or, without markers, at the start.
    """
    if not conversations:
        raise SequenceError("an example needs at least one conversation")
    n_conv = len(conversations)
    packed = n_conv > 1
    if packed and for_inference:
        raise SequenceError(f"the inference format takes one conversation per example, got {n_conv}")
    tokens = np.concatenate([t for t, _ in conversations]).astype(np.int32)
    mask = np.concatenate([m for _, m in conversations]).astype(np.float32)
    seg = np.concatenate([np.full(len(t), k + 1, np.int32) for k, (t, _) in enumerate(conversations)])
    if packed and root_subsegments:
        mask = mask * np.float32(math.sqrt(1.0 / n_conv))

    markers = np.flatnonzero(tokens == image_prompt_id)
    if len(markers) and len(markers) != len(images):
        raise SequenceError(f"the text has {len(markers)} <|image|> marker(s) but the example has "
                            f"{len(images)} image(s)")
    if len(markers) and packed:
        raise SequenceError("<|image|> markers are not supported in packed (multi-conversation) examples")
    # Insertion points in `tokens`: right after each marker, or all at the start.
    cuts = list(markers + 1) if len(markers) else [0] * len(images)

    parts_t, parts_m, parts_s = [np.array([bos_id], np.int32)], [np.zeros(1, np.float32)], \
        [np.array([IMAGE_SUBSEGMENT], np.int32)]
    offsets = []
    pos, length = 0, 1
    for cut, im in zip(cuts, images):
        parts_t.append(tokens[pos:cut]); parts_m.append(mask[pos:cut]); parts_s.append(seg[pos:cut])
        length += cut - pos
        offsets.append(length)
        n = len(im.tokens)
        parts_t.append(im.tokens); parts_m.append(np.zeros(n, np.float32))
        parts_s.append(np.full(n, IMAGE_SUBSEGMENT, np.int32))
        length += n
        pos = cut
    parts_t.append(tokens[pos:]); parts_m.append(mask[pos:]); parts_s.append(seg[pos:])
    full_t = np.concatenate(parts_t)
    full_m = np.concatenate(parts_m)
    full_s = np.concatenate(parts_s)

    if for_inference:
        out = dict(input_ids=full_t,
                   target_tokens=np.append(full_t[1:], -1).astype(np.int32),
                   loss_masks=np.append(full_m[1:], -1).astype(np.float32),
                   position_ids=np.arange(len(full_t), dtype=np.int32))
    else:
        seg_in = full_s[:-1]
        out = dict(input_ids=full_t[:-1], target_tokens=full_t[1:], loss_masks=full_m[1:],
                   position_ids=packed_position_ids(seg_in) if packed else np.arange(len(seg_in), dtype=np.int32))
        if packed:
            out["subsegment_ids"] = seg_in
    if images:
        # One image (the usual case): no copy of the ~10 MB crop array.
        join = (lambda xs: xs[0]) if len(images) == 1 else (lambda xs: np.concatenate(xs, axis=0))
        out["images"] = join([im.images for im in images])
        out["image_masks"] = join([im.image_masks for im in images])
        out["image_input_idx"] = np.concatenate(
            [np.where(im.patch_idx >= 0, im.patch_idx + off, im.patch_idx) for im, off in zip(images, offsets)],
            axis=0).astype(np.int32)
    return out


def truncate_example(example: dict, max_len: int) -> dict:
    """Cut the text arrays to `max_len` tokens, as the original's collator. Every image feature
    position must stay inside (the image block is never cut); the loss mask is cut with the
    targets, so it stays aligned."""
    n = len(example["input_ids"])
    if n <= max_len:
        return example
    idx = example.get("image_input_idx")
    if idx is not None and idx.size and int(idx.max()) >= max_len:
        raise SequenceError(f"max sequence length {max_len} cuts into the image tokens (the last image "
                            f"feature sits at position {int(idx.max())}); use a longer sequence length "
                            "or fewer crops")
    out = dict(example)
    for k in TEXT_KEYS:
        if k in out:
            out[k] = out[k][:max_len]
    return out
