"""Molmo2's chat format: messages -> the prompt string its released chat template renders
(docs/architecture.md#molmo2-preprocessing).

    <|image|>                                   one image, or "Image 1<|image|>Image 2<|image|>..." for several
    <|video|>                                   per video, after the images
    <|im_start|>user\\n{text}<|im_end|>\\n        first user turn
     <|im_start|>assistant\\n{text}              earlier answers (note the leading space, as the template renders it)
    <|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n   later user turns close the previous answer
    <|im_start|>assistant\\n                     with add_generation_prompt

A message's content is a string or a list of parts {"type": "text" | "image" | "video", ...}; text parts
are joined with one space, and a text part with a "style" outside `DEMO_STYLES` is prefixed "{style}: ".
A first message with role "subtitle" has its content written right after the media markers.
"""
from __future__ import annotations

import numpy as np

IMAGE_MARKER = "<|image|>"
VIDEO_MARKER = "<|video|>"

# Styles the template writes without a "{style}: " prefix (the released template's list).
DEMO_STYLES = frozenset((
    "point_count", "pointing", "cosyn_point", "user_qa", "long_caption", "short_caption", "video_long_caption",
    "video_short_caption", "video_point_track_per_frame", "video_point_track_start_end",
    "video_point_track_all_frames", "video_single_point_track_start_end", "video_transcript",
    "video_clip_caption_start_end", "video_clip_caption_start_end_in_seconds", "video_clip_transcript_start_end",
    "video_clip_transcript_start_end_in_seconds", "video_frame_caption_timestamp",
    "video_frame_caption_timestamp_in_seconds", "correction_qa", "text_sft", "video_point", "video_point_count",
    "video_count", "video_count_point", "multi_image_pointing", "multi_image_counting",
    "multi_image_point_then_count", "multi_image_count_then_point", "demo", "a_okvqa_mc", "ai2_diagram_no_letter",
    "ai2_diagram", "science_qa", "multi_image_mc", "multi_image_mc_exp", "mantis_instruct_mc",
    "video_multiple_choice", "video_multiple_choice_count_without_pointing",
    "video_multiple_choice_multiple_correct", "video_multiple_choice_w_subtitle"))


def _parts(message: dict, where: str) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return []
    if not isinstance(content, (list, tuple)) or not all(isinstance(p, dict) for p in content):
        raise ValueError(f"{where}: content must be a string or a list of dicts, got {type(content).__name__}")
    return list(content)


def _is_image(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


def _is_video(part: dict) -> bool:
    return not _is_image(part) and (part.get("type") == "video" or "video" in part or "video_url" in part)


def _text(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    text = ""
    for part in _parts(message, where):
        if part.get("type") != "text":
            continue
        styled = "style" in part and part["style"] not in DEMO_STYLES
        seg = f"{part['style']}: {part['text']}" if styled else part["text"]
        text = text + ("" if not text else " ") + seg
    return text


def format_chat(messages, add_generation_prompt: bool = False) -> str:
    """The prompt of a conversation (list of {"role", "content"} dicts), as Molmo2's chat template writes it."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    roles = [str(m.get("role", "")).lower() for m in messages]
    has_subtitle = bool(messages) and roles[0] == "subtitle"
    parts = [p for k, m in enumerate(messages) for p in _parts(m, f"message {k}")]
    n_images = sum(_is_image(p) for p in parts)
    n_videos = sum(_is_video(p) for p in parts)
    out = [IMAGE_MARKER] if n_images == 1 else [f"Image {i + 1}{IMAGE_MARKER}" for i in range(n_images)]
    out += [VIDEO_MARKER] * n_videos
    if has_subtitle:
        out.append(str(messages[0]["content"]))
    for k, (message, role) in enumerate(zip(messages, roles)):
        if role == "subtitle":
            continue
        turn = k + (0 if has_subtitle else 1)  # the template counts every message, subtitles included
        expected = "user" if turn % 2 == 1 else "assistant"
        if role != expected:
            raise ValueError(f"message {k}: role {role!r} where {expected!r} was expected "
                             "(roles must alternate user/assistant, starting with user)")
        text = _text(message, f"message {k}")
        if role == "user":
            out.append(("<|im_end|>\n" if turn > 1 else "") + f"<|im_start|>user\n{text}<|im_end|>\n")
        else:
            out.append(f" <|im_start|>assistant\n{text}")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def media(messages) -> tuple[list[np.ndarray], list]:
    """(images, videos) of a conversation in order: the "image" / "video" values of its image and video parts."""
    images, videos = [], []
    for k, message in enumerate(messages):
        for part in _parts(message, f"message {k}"):
            if part.get("type") == "image" and "image" in part:
                images.append(part["image"])
            elif part.get("type") == "video" and "video" in part:
                videos.append(part["video"])
    return images, videos
