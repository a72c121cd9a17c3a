"""Molmo2 training examples and batches: a record of the data contract (an image and its `message_list`)
-> Molmo2 token ids, targets and loss masks, pixels and pooling table; a list of them -> one fixed-shape
batch (docs/architecture.md#molmo2-training-data).

Text follows the chat template the model is asked with at inference (`molmo2_chat.format_chat` with the
generation prompt): the first user turn carries the image marker and the style prefix, every answer is
trained on together with its closing `<|im_end|>` (the EOS), and later turns continue
"\\n<|im_start|>user\\n...". Several conversations of one record become consecutive turns of one chat, in
random order. Pointing targets are written in Molmo2's `<points coords=...>` format (thousandths of the
image size); the rest of each turn is Molmo's conversation formatting (`formatting.conversation_turns`).

Batch layout (the model's names): input_ids, target_tokens, position_ids, mm_token_type_ids int32 [B, T];
loss_masks float32 [B, T]; pixel_values float32 [B * C, P, patch * patch * 3] with C = 1 + max_crops crops
per row (padding crops are zeros); image_token_pooling int32 [B * M, K] with M the most pooled tokens one
image can make (rows of -1 make no token), indices into the flat B * C * P patches.
"""
from __future__ import annotations

import math

import numpy as np

from molmo_jax.preprocess import formatting, molmo2_chat
from molmo_jax.preprocess.image_io import load_image
from molmo_jax.preprocess.molmo2_image import process_image
from molmo_jax.preprocess.sequence import SequenceError

POINTING_STYLES = ("pointing", "point_count")


def pointing_answer(conv: dict, image_size) -> str:
    """A pointing / counting target in Molmo2's format, from the conversation's points (pixels, or percent
    with point_scale 100)."""
    from molmo_jax.molmo2_points import molmo2_points_to_text

    label = str(conv.get("label", "")).lower()
    pts = np.asarray(conv["points"], np.float64).reshape(-1, 2)
    w, h = image_size
    if pts.shape[0] and float(conv.get("point_scale", 0) or 0) == 100.0:
        pts = pts / 100.0 * np.array([w, h])
    if pts.shape[0] == 0:
        return formatting.NONE_FOUND
    n = pts.shape[0]
    text = molmo2_points_to_text(np.ones(n), np.arange(1, n + 1), pts, w, h, alt=label, text=label)
    return f"Counting the {text} shows a total of {n}." if conv["style"] == "point_count" else text


def turns_of(conv: dict, rng, image_size, settings) -> list[tuple[str, str]]:
    """[(user text, assistant text), ...] of one conversation; the style rides on the first user text."""
    if not isinstance(conv, dict):
        raise formatting.FormatError(f"a conversation must be a dict, got {type(conv).__name__}")
    style = str(conv.get("style", ""))
    turns = formatting.conversation_turns(conv, rng, settings, image_size)
    if style in POINTING_STYLES and "points" in conv:
        turns[-1] = pointing_answer(conv, image_size)
    if len(turns) < 2 or len(turns) % 2:
        raise formatting.FormatError(f"training conversation with style {style!r} needs user/assistant turns "
                                     f"in pairs; got {len(turns)} turn(s)")
    pairs = [(turns[k], turns[k + 1]) for k in range(0, len(turns), 2)]
    pairs[0] = (_styled(style, pairs[0][0]), pairs[0][1])
    return pairs


def user_prompt(conv: dict, rng, image_size, settings) -> str:
    """The first user text of a conversation as training writes it (style prefix included): what an
    evaluation asks the model."""
    if not isinstance(conv, dict):
        raise formatting.FormatError(f"a conversation must be a dict, got {type(conv).__name__}")
    turns = formatting.conversation_turns(conv, rng, settings, image_size)
    if not turns:
        raise formatting.FormatError(f"conversation with style {conv.get('style')!r} has no user turn")
    return _styled(str(conv.get("style", "")), turns[0])


def _styled(style: str, text: str) -> str:
    if style and style not in molmo2_chat.DEMO_STYLES and style not in formatting.NO_PREFIX_STYLES:
        return f"{style}: {text}" if text else f"{style}:"
    return text


class Molmo2Examples:
    """Callable: (record, rng) -> one example's arrays (unbatched; see the module docstring)."""

    def __init__(self, processor, seq_len: int):
        self.processor, self.seq_len = processor, int(seq_len)
        self.format = formatting.FormatSettings()
        tok = processor.tokenizer
        self.eos_id = tok._tok.token_to_id(tok.eos_token)

    def __call__(self, example: dict, rng: np.random.Generator | None = None, **_) -> dict:
        rng = rng if rng is not None else np.random.default_rng(0)
        convs = example.get("message_list")
        if not isinstance(convs, (list, tuple)) or not convs:
            raise formatting.FormatError(f"example needs a non-empty 'message_list' (keys: {sorted(example)})")
        per_image, size = [], None
        if example.get("image") is not None:
            pixels = load_image(example["image"])
            size = (pixels.shape[1], pixels.shape[0])
            per_image = [process_image(pixels, self.processor.image)]
        pairs = [p for k in rng.permutation(len(convs)) for p in turns_of(convs[int(k)], rng, size, self.format)]
        tok = self.processor.tokenizer
        content = [{"type": "image"}] * len(per_image) + [{"type": "text", "text": pairs[0][0]}]
        first = molmo2_chat.format_chat([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = self.processor.prompt_ids(first, iter(per_image), iter(()))
        n_prompt = len(ids)
        weights = [0.0] * len(ids)
        for k, (user, answer) in enumerate(pairs):
            if k:
                context = tok.encode(f"\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
                ids += context
                weights += [0.0] * len(context)
            target = tok.encode(answer) + [self.eos_id]
            ids += target
            weights += [1.0] * len(target)
        if n_prompt + 1 > self.seq_len:
            raise SequenceError(f"the prompt with its image tokens is {n_prompt} tokens, longer than the sequence "
                                f"length {self.seq_len}; use a longer sequence or fewer crops")
        ids = np.asarray(ids[:self.seq_len + 1], np.int32)
        weights = np.asarray(weights[:self.seq_len + 1], np.float32)
        types = np.isin(ids, self.processor.mm_token_ids).astype(np.int32)
        out = dict(input_ids=ids[:-1], target_tokens=ids[1:], loss_masks=weights[1:],
                   position_ids=np.arange(len(ids) - 1, dtype=np.int32), mm_token_type_ids=types[:-1])
        if per_image:
            out["pixel_values"] = per_image[0].pixel_values
            out["image_token_pooling"] = per_image[0].token_pooling
        out["metadata"] = dict(example.get("metadata") or {}, image_size=size)
        return out


def pooled_rows_bound(crop_patches: int, pooling, max_crops: int) -> int:
    """The most pooled tokens one image makes: at most a pooled crop's worth per crop (the overlap margins
    only drop some) and one for the resized view."""
    per_crop = math.ceil(crop_patches / pooling[0]) * math.ceil(crop_patches / pooling[1])
    return (1 + max_crops) * per_crop


class Molmo2Collator:
    """Examples -> one batch of fixed shapes: `batch_size` rows of `seq_len` tokens, C = 1 + max_crops crops
    and M = `pooled_rows_bound` pooling rows per row (one image per example)."""
    packs = False   # one record per row

    def __init__(self, image_settings, seq_len: int, batch_size: int):
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        s = image_settings
        self.crops, self.patches = 1 + s.max_crops, s.crop_patches ** 2
        self.pixels = s.patch * s.patch * 3
        self.rows = pooled_rows_bound(s.crop_patches, s.pooling, s.max_crops)
        self.window = s.pooling[0] * s.pooling[1]

    @property
    def max_sequence_length(self) -> int:
        return self.seq_len

    def __call__(self, examples: list[dict]) -> dict:
        b, t = self.batch_size, self.seq_len
        if not examples or len(examples) > b:
            raise ValueError(f"{len(examples)} examples for a batch of {b}")
        out = {k: np.full((b, t), -1, np.int32) for k in ("input_ids", "target_tokens", "position_ids")}
        out["loss_masks"] = np.zeros((b, t), np.float32)
        out["mm_token_type_ids"] = np.zeros((b, t), np.int32)
        pixels = np.zeros((b * self.crops, self.patches, self.pixels), np.float32)
        pooling = np.full((b * self.rows, self.window), -1, np.int32)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            for key in ("input_ids", "target_tokens", "position_ids", "loss_masks", "mm_token_type_ids"):
                out[key][i, :n] = ex[key]
            if ex.get("pixel_values") is not None:
                crops, table = ex["pixel_values"], ex["image_token_pooling"]
                if len(crops) > self.crops or len(table) > self.rows or table.shape[1] != self.window:
                    raise SequenceError(f"example {i}: {len(crops)} crops and {table.shape} pooling rows exceed "
                                        f"the batch's {self.crops} crops and [{self.rows}, {self.window}]")
                pixels[i * self.crops:i * self.crops + len(crops)] = crops
                offset = i * self.crops * self.patches
                pooling[i * self.rows:i * self.rows + len(table)] = np.where(table >= 0, table + offset, -1)
        return dict(out, pixel_values=pixels, image_token_pooling=pooling)
