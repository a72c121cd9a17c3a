"""Molmo2 training examples and batches: a record of the data contract (an image, several images or a
video's frames, and its `message_list`) -> Molmo2 token ids, targets and loss masks, pixels and pooling
tables; a list of them -> one fixed-shape batch (docs/architecture.md#molmo2-training-data).

Text follows the chat template the model is asked with at inference (`molmo2_chat.format_chat` with the
generation prompt): the first user turn carries the image markers ("Image 1<|image|>..." for several) or
the video's frame times and tokens, and the style prefix; every answer is trained on together with its
closing `<|im_end|>` (the EOS), and later turns continue "\\n<|im_start|>user\\n...". Several conversations
of one record become consecutive turns of one chat, in random order. Pointing targets are written in
Molmo2's `<points coords=...>` format (thousandths of the image size, on the conversation's
`image_index`; on a video at the sampled frames' times, and `tracking` conversations as `<tracks ...>`);
the rest of each turn is Molmo's conversation formatting (`formatting.conversation_turns`).

Batch layout (the model's names): input_ids, target_tokens, position_ids, mm_token_type_ids int32 [B, T];
loss_masks float32 [B, T]; pixel_values float32 [B * C, P, patch * patch * 3] with C views per row (the
crops of up to `max_images` images, or up to `max_frames` video frames; padding views are zeros);
image_token_pooling int32 [B * M, K] with M the most pooled tokens a row can make (rows of -1 make no
token), indices into the flat B * C * P patches (`batch_layout`).

Packing (`pack_records` > 1): a row holds several records one after another (`pack_row`), each with its own
positions from 0, `subsegment_ids` numbering the records 0, 1, ... (-1 = padding) and its views and pooling
rows after the previous record's; the model's mask keeps them apart (docs/architecture.md#molmo2-packing). A
packed row has room for `pack_records` records' views and pooling rows.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from molmo_jax.preprocess import formatting, molmo2_chat
from molmo_jax.preprocess.image_io import frame_files, load_image
from molmo_jax.preprocess.molmo2_image import process_images
from molmo_jax.preprocess.molmo2_video import frame_pooling, process_videos
from molmo_jax.preprocess.sequence import SequenceError

POINTING_STYLES = ("pointing", "point_count")
TRACKING_STYLES = ("tracking",)   # video only: objects keep their ids across frames (`<tracks>`)


def pointing_answer(conv: dict, image_size, image_number: int = 1, timestamps=None) -> str:
    """A pointing / counting / tracking target in Molmo2's format, from the conversation's points (pixels, or
    percent with point_scale 100) on image `image_number` (1-based) of the record or, with `timestamps` (the
    seconds of a video's sampled frames), at the conversation's `times` (seconds, one per point) with its
    `ids` (object ids; default each point its own object): a point goes to the sampled frame nearest its
    time, and is left out if that frame is more than half a frame interval away."""
    from molmo_jax.molmo2_points import molmo2_points_to_text

    label = str(conv.get("label", "")).lower()
    pts = np.asarray(conv["points"], np.float64).reshape(-1, 2)
    w, h = image_size
    if pts.shape[0] and float(conv.get("point_scale", 0) or 0) == 100.0:
        pts = pts / 100.0 * np.array([w, h])
    if pts.shape[0] == 0:
        return formatting.NONE_FOUND
    n, style = pts.shape[0], conv["style"]
    frames, ids, tag, time_format = np.full(n, image_number), np.arange(1, n + 1), "points", None
    if timestamps is not None:
        frames, ids = _video_points(conv, n, np.asarray(timestamps, np.float64))
        keep = ~np.isnan(frames)
        order = np.flatnonzero(keep)[np.argsort(frames[keep], kind="stable")]
        frames, ids, pts, time_format = frames[order], ids[order], pts[order], ".1f"
        tag = "tracks" if style in TRACKING_STYLES else "points"
    text = molmo2_points_to_text(frames, ids, pts, w, h, alt=label, text=label, tag=tag, time_format=time_format)
    return f"Counting the {text} shows a total of {np.unique(ids).size}." if style == "point_count" else text


def _video_points(conv: dict, n: int, stamps: np.ndarray):
    """(sampled-frame time of each point, NaN where none is within half a frame interval; object ids)."""
    from molmo_jax.molmo2_points import nearest_frames

    times, ids = conv.get("times"), conv.get("ids")
    if times is None or len(times) != n:
        raise formatting.FormatError(f"a video {conv['style']!r} conversation needs 'times': the second of each of "
                                     f"its {n} points")
    if ids is None and conv["style"] in TRACKING_STYLES:
        raise formatting.FormatError("a 'tracking' conversation needs 'ids': the object of each point")
    ids = np.arange(1, n + 1) if ids is None else np.asarray(ids)
    if len(ids) != n or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise formatting.FormatError(f"'ids' must be {n} non-negative integers, one per point")
    times = np.asarray(times, np.float64)
    nearest = stamps[nearest_frames(times, stamps)]
    half = np.median(np.diff(stamps)) / 2 if len(stamps) > 1 else np.inf
    on_frame = np.abs(times - nearest) <= half + 1e-6
    if not on_frame.any():
        raise formatting.FormatError(f"none of the {n} points' times is within half a frame interval of a sampled "
                                     f"frame ({', '.join(f'{t:.1f}' for t in stamps)} s)")
    return np.where(on_frame, nearest, np.nan), ids


def turns_of(conv: dict, rng, sizes, settings, timestamps=None) -> list[tuple[str, str]]:
    """[(user text, assistant text), ...] of one conversation; the style rides on the first user text.
    `sizes`: (width, height) of each image of the record (or of the video's frames), `timestamps`: the
    seconds of a video's sampled frames. A pointing conversation points on its `image_index` (1-based,
    default 1) or, on a video, at its `times`; a tracking one only on a video."""
    if not isinstance(conv, dict):
        raise formatting.FormatError(f"a conversation must be a dict, got {type(conv).__name__}")
    style = str(conv.get("style", ""))
    number = conv.get("image_index", 1)
    if not isinstance(number, int) or not 1 <= number <= max(len(sizes), 1):
        raise formatting.FormatError(f"image_index {number!r} outside the record's {len(sizes)} image(s)")
    size = sizes[number - 1] if sizes else None
    if style in TRACKING_STYLES and timestamps is None:
        raise formatting.FormatError("a 'tracking' conversation on a record without a video")
    turns = formatting.conversation_turns(conv, rng, settings, size)
    if style in POINTING_STYLES + TRACKING_STYLES and "points" in conv:
        turns = turns[:1] + [pointing_answer(conv, size, number, timestamps)]
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


def _as_list(value, what: str) -> list:
    if isinstance(value, np.ndarray) and value.ndim == 4:
        return list(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise formatting.FormatError(f"record's {what!r} is an empty list")
        return list(value)
    return [value]


class Molmo2Examples:
    """Callable: (record, rng) -> one example's arrays (unbatched; see the module docstring). A record holds
    `image` (one, or a list: several images) or `video` (its frames or their folder, with optional `fps`: the
    rate they were taken at); a video is sampled to at most `max_frames` frames (the processor's own limits
    apply too)."""

    def __init__(self, processor, seq_len: int, max_images: int = 1, max_frames: int = 0):
        self.processor, self.seq_len = processor, int(seq_len)
        self.max_images, self.max_frames = int(max_images), int(max_frames)
        self.format = formatting.FormatSettings()
        tok = processor.tokenizer
        self.eos_id = tok._tok.token_to_id(tok.eos_token)

    def media(self, example: dict) -> tuple[dict, list, list, list]:
        """(the processor's pixel and pooling arrays, per-image inputs, per-video inputs, (width, height) of
        each image or of the video's frames)."""
        image, video = example.get("image"), example.get("video")
        if image is not None and video is not None:
            raise formatting.FormatError("a record holds images or a video, not both")
        if video is not None:
            if self.max_frames < 1:
                raise formatting.FormatError("a video record, but data.max_frames is 0 (no frames per row)")
            if isinstance(video, str) and os.path.isdir(video):
                video = frame_files(video)
            frames = [load_image(f) for f in _as_list(video, "video")]
            fps = example.get("fps")
            meta = dict(total_num_frames=len(frames), fps=float(fps)) if fps else None
            arrays, per_video = process_videos([frames], self.processor.video, [meta],
                                               num_frames=min(self.max_frames, self.processor.video.num_frames))
            return arrays, [], per_video, [(frames[0].shape[1], frames[0].shape[0])]
        if image is None:
            return {}, [], [], []
        pictures = [load_image(im) for im in _as_list(image, "image")]
        if len(pictures) > self.max_images:
            raise SequenceError(f"{len(pictures)} images in a record; data.max_images is {self.max_images}")
        arrays, per_image = process_images(pictures, self.processor.image)
        return arrays, per_image, [], [(p.shape[1], p.shape[0]) for p in pictures]

    def __call__(self, example: dict, rng: np.random.Generator | None = None, **_) -> dict:
        rng = rng if rng is not None else np.random.default_rng(0)
        convs = example.get("message_list")
        if not isinstance(convs, (list, tuple)) or not convs:
            raise formatting.FormatError(f"example needs a non-empty 'message_list' (keys: {sorted(example)})")
        arrays, per_image, per_video, sizes = self.media(example)
        pairs = [p for k in rng.permutation(len(convs))
                 for p in turns_of(convs[int(k)], rng, sizes, self.format,
                                   timestamps=per_video[0].timestamps if per_video else None)]
        tok = self.processor.tokenizer
        content = ([{"type": "image"}] * len(per_image) + [{"type": "video"}] * len(per_video)
                   + [{"type": "text", "text": pairs[0][0]}])
        first = molmo2_chat.format_chat([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = self.processor.prompt_ids(first, iter(per_image), iter(per_video))
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
                                f"length {self.seq_len}; use a longer sequence, fewer crops or fewer frames")
        ids = np.asarray(ids[:self.seq_len + 1], np.int32)
        weights = np.asarray(weights[:self.seq_len + 1], np.float32)
        types = np.isin(ids, self.processor.mm_token_ids).astype(np.int32)
        out = dict(input_ids=ids[:-1], target_tokens=ids[1:], loss_masks=weights[1:],
                   position_ids=np.arange(len(ids) - 1, dtype=np.int32), mm_token_type_ids=types[:-1])
        out.update({k: arrays[k] for k in ("pixel_values", "image_token_pooling", "pixel_values_videos",
                                           "video_token_pooling") if k in arrays})
        meta = dict(example.get("metadata") or {}, image_size=sizes[0] if sizes else None)
        if len(sizes) > 1:
            meta["image_sizes"] = sizes
        if per_video:
            meta["frame_times"] = list(per_video[0].timestamps)
        out["metadata"] = meta
        return out


def pooled_rows_bound(crop_patches: int, pooling, max_crops: int) -> int:
    """The most pooled tokens one image makes: at most a pooled crop's worth per crop (the overlap margins
    only drop some) and one for the resized view."""
    per_crop = math.ceil(crop_patches / pooling[0]) * math.ceil(crop_patches / pooling[1])
    return (1 + max_crops) * per_crop


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Per-row sizes of a Molmo2 training batch: `crops` views (the images' crops or the video's frames) of
    `patches` patches of `pixels` values, and `rows` pooling rows of `window` slots."""
    crops: int
    patches: int
    pixels: int
    rows: int
    window: int


def batch_layout(image, video=None, max_images: int = 1, max_frames: int = 0) -> BatchLayout:
    """The layout that holds any record of up to `max_images` images (Molmo2ImageSettings `image`) or one
    video of up to `max_frames` frames (Molmo2VideoSettings `video`; frames are one view each)."""
    crops = max_images * (1 + image.max_crops)
    rows = max_images * pooled_rows_bound(image.crop_patches, image.pooling, image.max_crops)
    window = image.pooling[0] * image.pooling[1]
    if max_frames:
        if video is None or (video.crop_size, video.patch) != (image.crop_size, image.patch):
            raise ValueError("video frames must be cut like the images' crops (same crop size and patch)")
        _, frame_rows, frame_cols = frame_pooling(video)
        crops, rows = max(crops, max_frames), max(rows, max_frames * frame_rows * frame_cols)
        window = max(window, video.pooling[0] * video.pooling[1])
    return BatchLayout(crops, image.crop_patches ** 2, image.patch * image.patch * 3, rows, window)


def _views(ex: dict):
    """(views [V, P, F], pooling table [R, K]) of one example, its video's or its images' (None, None: none)."""
    video = ex.get("pixel_values_videos") is not None
    crops = ex.get("pixel_values_videos" if video else "pixel_values")
    return (None, None) if crops is None else (crops, ex["video_token_pooling" if video else "image_token_pooling"])


def shift_pooling(table: np.ndarray, patches: int) -> np.ndarray:
    """Pooling indices moved `patches` patches on (the patches of the views before); empty slots stay -1."""
    return np.where(table >= 0, table + patches, -1).astype(np.int32)


def global_pooling(batch: dict, first_view: int) -> dict:
    """A batch whose pooling indices (into this process's crops) point into the global batch's crops, where
    this process's crops start at row `first_view` of the global `pixel_values` (several hosts)."""
    pooling = batch.get("image_token_pooling")
    if pooling is None or not first_view:
        return batch
    patches = np.asarray(batch["pixel_values"]).shape[1]
    return dict(batch, image_token_pooling=shift_pooling(np.asarray(pooling), first_view * patches))


def pack_row(examples: list[dict], seq_len: int, layout: BatchLayout) -> tuple[dict, int]:
    """(one example holding, in order, every one of `examples` that still fits the row's tokens, views and
    pooling rows, the number left out). The packed example numbers its records in `subsegment_ids` and
    offsets each record's pooling indices by the views before it."""
    kept, tokens, views, rows = [], 0, 0, 0
    for ex in examples:
        crops, table = _views(ex)
        n_views, n_rows = (0, 0) if crops is None else (len(crops), len(table))
        if (tokens + len(ex["input_ids"]) > seq_len or views + n_views > layout.crops or rows + n_rows > layout.rows
                or (table is not None and table.shape[1] > layout.window)):
            continue
        kept.append((ex, crops, table, views))
        tokens, views, rows = tokens + len(ex["input_ids"]), views + n_views, rows + n_rows
    if not kept:
        raise SequenceError(f"none of {len(examples)} examples fits a packed row of {seq_len} tokens, {layout.crops} "
                            f"views and {layout.rows} pooling rows")
    out = {key: np.concatenate([k[0][key] for k in kept]) for key in
           ("input_ids", "target_tokens", "loss_masks", "position_ids", "mm_token_type_ids")}
    out["subsegment_ids"] = np.concatenate([np.full(len(k[0]["input_ids"]), j, np.int32) for j, k in enumerate(kept)])
    media = [(crops, table, start) for _, crops, table, start in kept if crops is not None]
    if media:
        tables = [np.full((len(t), layout.window), -1, np.int32) for _, t, _ in media]
        for wide, (_, table, start) in zip(tables, media):
            wide[:, :table.shape[1]] = shift_pooling(table, start * layout.patches)
        out.update(pixel_values=np.concatenate([c for c, _, _ in media]), image_token_pooling=np.concatenate(tables))
    return out, len(examples) - len(kept)


class Molmo2Collator:
    """Examples -> one batch of fixed shapes: `batch_size` rows of `seq_len` tokens, and per row the
    `batch_layout`'s crops and pooling rows. A video's frames go into `pixel_values` and its pooling rows
    into `image_token_pooling` (slots beyond a table's window are -1): the model encodes and pools frames
    exactly as image crops, so one batch may mix image and video records. With `pack_records` > 1 each
    row has room for that many records (`pack_row` fills it) and the batch carries `subsegment_ids`."""

    def __init__(self, image_settings, seq_len: int, batch_size: int, *, video_settings=None, max_images: int = 1,
                 max_frames: int = 0, pack_records: int = 1):
        self.seq_len, self.batch_size, self.pack_records = int(seq_len), int(batch_size), int(pack_records)
        if self.pack_records < 1:
            raise ValueError(f"data.pack_records must be >= 1, got {pack_records}")
        k = self.pack_records
        self.layout = batch_layout(image_settings, video_settings, max_images * k, max_frames * k)
        self.crops, self.patches, self.rows = self.layout.crops, self.layout.patches, self.layout.rows

    @property
    def packs(self) -> bool:
        """Whether batches carry `subsegment_ids` (several records per row)."""
        return self.pack_records > 1

    def pack(self, examples: list[dict]) -> tuple[dict, int]:
        return pack_row(examples, self.seq_len, self.layout)

    @property
    def max_sequence_length(self) -> int:
        return self.seq_len

    def __call__(self, examples: list[dict]) -> dict:
        b, t, lay = self.batch_size, self.seq_len, self.layout
        if not examples or len(examples) > b:
            raise ValueError(f"{len(examples)} examples for a batch of {b}")
        out = {k: np.full((b, t), -1, np.int32) for k in ("input_ids", "target_tokens", "position_ids")}
        out["loss_masks"] = np.zeros((b, t), np.float32)
        out["mm_token_type_ids"] = np.zeros((b, t), np.int32)
        if self.packs:
            out["subsegment_ids"] = np.full((b, t), -1, np.int32)
        pixels = np.zeros((b * lay.crops, lay.patches, lay.pixels), np.float32)
        pooling = np.full((b * lay.rows, lay.window), -1, np.int32)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            for key in ("input_ids", "target_tokens", "position_ids", "loss_masks", "mm_token_type_ids"):
                out[key][i, :n] = ex[key]
            if self.packs:
                out["subsegment_ids"][i, :n] = ex.get("subsegment_ids", 0)
            crops, table = _views(ex)
            if crops is None:
                continue
            video = ex.get("pixel_values_videos") is not None
            if len(crops) > lay.crops or len(table) > lay.rows or table.shape[1] > lay.window:
                raise SequenceError(f"example {i}: {len(crops)} {'frames' if video else 'crops'} and {table.shape} "
                                    f"pooling rows exceed the batch's {lay.crops} views and [{lay.rows}, {lay.window}]"
                                    " (data.max_images / data.max_frames)")
            pixels[i * lay.crops:i * lay.crops + len(crops)] = crops
            offset = i * lay.crops * lay.patches
            rows = pooling[i * lay.rows:i * lay.rows + len(table), :table.shape[1]]
            rows[:] = shift_pooling(table, offset)
        return dict(out, pixel_values=pixels, image_token_pooling=pooling)
