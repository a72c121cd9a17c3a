"""Stored records -> examples in the input contract (image + message_list + metadata), per dataset.

The builders keep the Hub's data as it is (`builders/hub.py`); everything a training stage decides is
done here, with the per-example RNG, so stage 1 and stage 2 read the same records:
- which conversations an example packs (PixMo-Cap modes, synthetic caption vs task mode);
- styles and point scales (PixMo-Points percent, PixMo-Count pixels; `pointing` vs `point_count`);
- the "how many" rule: a question starting with "how many" gets a random "do not point" instruction,
  so that plain-text counting answers and pointing answers do not contradict each other;
- point-explanation answers: each `<|POINT|>` placeholder becomes the point string of its annotation.

Bad data never raises anything but `BadRecord` (the loader skips the record and counts the reason).
Repairs are counted in `notes` (a Counter): points outside the image are clamped to its border (the
original keeps them, which writes e.g. x="103.2" into a target); a conversation with NaN coordinates is
dropped (its target is unknowable), and the record only if no conversation is left.

Deliberate choices where the original snapshot has a quirk (docs/architecture.md#reference-quirks):
- PixMo-Points styles follow the dataset names (`pixmo_points` -> `pointing`, `*_counting` ->
  `point_count`), as the later Molmo code; the snapshot swaps them;
- PixMo-CapQA: the prefix goes before the matching user turn itself (the snapshot repeats the first turn).
"""
from __future__ import annotations

import collections
import json
import re
from collections.abc import Mapping

import numpy as np

from molmo_jax import points as points_lib

POINT_PLACEHOLDER = "<|POINT|>"
CLOCK_QUESTION = "What time is being shown?"
CAPTION_STYLES = ("long_caption", "transcript")
_HOW_MANY = re.compile(r"how many.*")

# "Do not point" instructions put before "how many" questions; written for this project (the original's
# list is not available). Each ends with a space or a newline, as it is joined to the question directly.
NO_POINTING_PREFIXES = (
    "No pointing: ", "Do not point. ", "Answer without points: ", "NO POINTING\n", "Don't point, just answer: ",
    "Without pointing: ", "Answer in words, no points: ", "no pointing: ", "Do not use points. ",
    "Reply without pointing: ", "Just give the number, no pointing: ", "Answer directly (no points): ",
    "Do not point to anything. ", "No points please: ", "Text only, no pointing: ", "Skip the pointing: ",
    "Answer without pointing.\n", "Please do not point: ", "No need to point: ", "Dont point: ",
    "Respond without points: ", "No pointing, answer briefly: ", "Without using points: ",
    "Do not mark any points. ", "Give a plain answer without points: ", "No coordinates: ",
    "Answer, but do not point: ", "Do not point\n",
)


class BadRecord(ValueError):
    """A record that gives no usable example; the message is the short reason the loader counts."""


# ---------------------------------------------------------------------------------------------
# Reading stored records

def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def hub_fields(record: Mapping) -> tuple[bytes, dict, dict]:
    """(image bytes, annotations, metadata) of a record of a `builders/hub.py` builder."""
    try:
        annotations = json.loads(_text(record["annotations"]))
    except (KeyError, ValueError) as error:
        raise BadRecord(f"unreadable annotations ({type(error).__name__})") from None
    image = record.get("image")
    if not isinstance(image, (bytes, bytearray)) or not image:
        raise BadRecord("record without image bytes")
    metadata = {"image_url": _text(record.get("image_url", b"")),
                "image_size": [int(record.get("width", 0)), int(record.get("height", 0))]}
    return bytes(image), annotations, metadata


def no_pointing(question: str, rng: np.random.Generator) -> str:
    """The "how many" rule: a random no-pointing instruction before a question starting with "how many"."""
    if _HOW_MANY.fullmatch(question.lower()):
        return NO_POINTING_PREFIXES[int(rng.integers(len(NO_POINTING_PREFIXES)))] + question
    return question


def clean_points(points, limits: tuple[float, float], notes: collections.Counter) -> np.ndarray | None:
    """float [N, 2] clamped into [0, limits]; None when a coordinate is missing or NaN."""
    pts = np.asarray([[np.nan if v is None else v for v in p] for p in points or []], np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(pts)):
        return None
    clamped = np.clip(pts, 0.0, np.asarray(limits, np.float64))
    if not np.array_equal(clamped, pts):
        notes["points clamped into the image"] += 1
    return clamped


def _examples_of(image, conversations, metadata, what: str) -> dict:
    if not conversations:
        raise BadRecord(f"no usable {what}")
    return {"image": image, "message_list": conversations, "metadata": metadata}


# ---------------------------------------------------------------------------------------------
# PixMo

def pixmo_cap(record, rng, notes, mode: str = "captions") -> dict:
    image, ann, meta = hub_fields(record)
    caption = str(ann.get("caption") or "").strip()
    transcripts = [t for t in ann.get("transcripts") or [] if str(t).strip()]
    caption_conv = [{"style": "long_caption", "text": caption}] if caption else []
    if mode == "captions":
        conversations = caption_conv
    elif mode == "transcripts":
        conversations = [{"style": "transcript", "text": t} for t in transcripts]
    elif mode in ("transcript_and_caption", "transcript1_and_caption"):
        conversations = list(caption_conv)
        if transcripts:
            k = int(rng.integers(len(transcripts))) if mode == "transcript_and_caption" else 0
            conversations.append({"style": "transcript", "text": transcripts[k]})
        else:
            notes["no transcript: caption only"] += 1
    else:
        raise ValueError(f"unknown pixmo_cap mode {mode!r}")
    return _examples_of(image, conversations, meta, "caption or transcript")


def pixmo_ask_model_anything(record, rng, notes) -> dict:
    del notes
    image, ann, meta = hub_fields(record)
    conversations = [{"style": "user_qa", "question": no_pointing(str(q), rng), "answer": str(a)}
                     for q, a in zip(ann.get("question") or [], ann.get("answer") or []) if q and a]
    return _examples_of(image, conversations, meta, "question")


def pixmo_cap_qa(record, rng, notes) -> dict:
    del notes
    image, ann, meta = hub_fields(record)
    conversations = []
    for turns in ann.get("messages") or []:
        turns = [no_pointing(str(t), rng) if k % 2 == 0 else str(t) for k, t in enumerate(turns)]
        if len(turns) >= 2 and len(turns) % 2 == 0:
            conversations.append({"style": "synthetic_qa", "messages": turns})
    return _examples_of(image, conversations, meta, "dialogue")


def _point_conversations(labels, point_lists, style, limits, scale, notes) -> list[dict]:
    conversations = []
    for label, points in zip(labels, point_lists):
        pts = clean_points(points, limits, notes)
        if pts is None:
            notes["conversation dropped: NaN or missing coordinates"] += 1
            continue
        conversations.append({"style": style, "label": str(label), "points": pts.astype(np.float32),
                              "point_scale": scale})
    return conversations


def pixmo_points(record, rng, notes, counting: bool = False) -> dict:
    del rng
    image, ann, meta = hub_fields(record)
    style = "point_count" if counting else "pointing"
    conversations = _point_conversations(ann.get("label") or [], ann.get("points") or [], style,
                                         (100.0, 100.0), 100.0, notes)
    return _examples_of(image, conversations, meta, "label")


def pixmo_count(record, rng, notes, counting: bool = False) -> dict:
    del rng
    image, ann, meta = hub_fields(record)
    width, height = meta["image_size"]
    style = "point_count" if counting else "pointing"
    conversations = _point_conversations([ann.get("label")], [ann.get("points") or []], style,
                                         (float(width), float(height)), 0, notes)
    meta["count"] = int(ann.get("count") or 0)
    return _examples_of(image, conversations, meta, "label")


def fill_point_placeholders(response: str, alts, inlines, point_lists, notes) -> str | None:
    """`response` with its k-th <|POINT|> replaced by annotation k's point string; None if a point is NaN."""
    pieces = response.split(POINT_PLACEHOLDER)
    out = [pieces[0]]
    for piece, alt, inline, points in zip(pieces[1:], alts, inlines, point_lists):
        pts = clean_points(points, (100.0, 100.0), notes)
        if pts is None:
            return None
        out.append(points_lib.points_to_text(pts, str(alt), str(inline)) if len(pts) else str(inline))
        out.append(piece)
    return "".join(out)


def pixmo_point_explanations(record, rng, notes) -> dict:
    del rng
    image, ann, meta = hub_fields(record)
    conversations = []
    for question, response, alts, inlines, pts in zip(ann.get("question") or [], ann.get("parsed_response") or [],
                                                      ann.get("alt_text") or [], ann.get("inline_text") or [],
                                                      ann.get("points") or []):
        answer = fill_point_placeholders(str(response), alts, inlines, pts, notes)
        if answer is None:
            notes["conversation dropped: NaN or missing coordinates"] += 1
            continue
        conversations.append({"style": "point_qa", "question": str(question), "answer": answer})
    return _examples_of(image, conversations, meta, "question")


def pixmo_docs(record, rng, notes, subset: str = "charts") -> dict:
    del rng, notes
    image, ann, meta = hub_fields(record)
    conversations = [{"style": f"pixmo_docs_{subset}", "question": q["question"], "answer": q["answer"]}
                     for q in ann.get("questions") or [] if q.get("question") and q.get("answer")]
    return _examples_of(image, conversations, meta, "question")


def clock_answer(ann: dict) -> str | None:
    """'H:MM' from `watch_time` ('10:15' or '10:15:30'), else from hour/minute; None if neither is usable."""
    text = str(ann.get("watch_time") or "").strip()
    match = re.fullmatch(r"(\d{1,2}):(\d{2})(?::\d{2})?(\s*[AaPp][Mm])?", text)
    if match:
        return f"{int(match.group(1))}:{match.group(2)}"
    if text:
        return text
    if ann.get("hour") is not None and ann.get("minute") is not None:
        return f"{int(ann['hour'])}:{int(ann['minute']):02d}"
    return None


def pixmo_clocks(record, rng, notes) -> dict:
    del rng, notes
    image, ann, meta = hub_fields(record)
    answer = clock_answer(ann)
    conversations = [{"style": "clocks", "question": CLOCK_QUESTION, "answer": answer}] if answer else []
    return _examples_of(image, conversations, meta, "time")


def vqa(record, rng, notes) -> dict:
    """Questions about one image, several images (`media` "images") or a video's frames (`media` "video",
    with `fps`): the further images' bytes are the record's `more_images`."""
    del rng
    image, ann, meta = hub_fields(record)
    qas = [dict(qa) for qa in ann.get("qas") or []]
    weights = [qa.pop("weight", None) for qa in qas]
    example = _examples_of(image, qas, meta, "question")
    media = ann.get("media")
    if media in ("images", "video"):
        example.pop("image")
        example[{"images": "image", "video": "video"}[media]] = [image] + [bytes(b) for b in
                                                                        record.get("more_images", [])]
        if media == "video" and ann.get("fps"):
            example["fps"] = float(ann["fps"])
    if len(qas) == 1 and weights[0] is not None:
        example["weight"] = float(weights[0])
    elif any(w is not None for w in weights):
        notes["loss weights ignored in a packed example"] += 1
    return example


# ---------------------------------------------------------------------------------------------
# Synthetic PixMo

def synthetic(record, rng, notes, mode: str = "captions") -> dict:
    """mode "captions": the caption and the transcript (stage 1); "tasks": every other conversation
    (pointing, counting, QA, clocks, charts) for stage 2."""
    del rng, notes
    from input_pipeline.builders.synthetic import load_example

    try:
        example = load_example(record)
    except (KeyError, ValueError) as error:
        raise BadRecord(f"unreadable synthetic record ({type(error).__name__})") from None
    if mode == "captions":
        keep = [c for c in example["message_list"] if c["style"] in CAPTION_STYLES]
    elif mode == "tasks":
        keep = [c for c in example["message_list"] if c["style"] not in CAPTION_STYLES]
    else:
        raise ValueError(f"unknown synthetic mode {mode!r}")
    return _examples_of(example["image"], keep, example["metadata"], "conversation")


CONVERTERS = {
    "pixmo_cap": pixmo_cap, "pixmo_ask_model_anything": pixmo_ask_model_anything, "pixmo_cap_qa": pixmo_cap_qa,
    "pixmo_points": pixmo_points, "pixmo_count": pixmo_count, "pixmo_point_explanations": pixmo_point_explanations,
    "pixmo_docs": pixmo_docs, "pixmo_clocks": pixmo_clocks, "vqa": vqa, "synthetic": synthetic,
}
