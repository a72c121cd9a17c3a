"""Conversation -> list of message strings, as the released models expect (docs/architecture.md#prompt-formatting).

A conversation (one entry of an example's `message_list`, see the data contract) becomes
[user, assistant, user, assistant, ...] strings; inference formats end with a user message. The
style prefix (system prompt) goes in front of the first user message, then role formatting
("User: ... Assistant:") and the leading spaces are applied. All random choices come from the
`rng` passed in (a per-example seeded numpy Generator), so evaluation prompts are deterministic.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from molmo_jax.preprocess import templates

# Styles that get no prefix 90% of the time under demo_or_style (docs/architecture.md#prompt-formatting).
DEMO_STYLES = ("point_count", "pointing", "user_qa", "long_caption")
NO_PREFIX_STYLES = ("android_control", "demo")
STYLE_ALIASES = {"eval_short_answer": "vqa2", "eval_multiple_choice": "a_okvqa_mc"}
NO_LETTER_STYLES = ("ai2_diagram_no_letter",)
NONE_FOUND = "There are none."


class FormatError(ValueError):
    """A conversation that cannot be formatted: names the style and the missing/bad field."""


@dataclasses.dataclass(frozen=True)
class FormatSettings:
    """Text settings. Defaults = the released (stage-2) models; `stage1()` = caption pre-training."""
    prompt_templates: str = "uber_model"      # or "none" (the user prompt is empty for text examples)
    message_format: str = "role"              # or "none"
    system_prompt: str = "demo_or_style"      # or "style", "style_and_length", "none"
    always_start_with_space: bool = True
    default_inference_len: int = 65           # length hint at inference under style_and_length
    multi_annotation_weighting: str | None = "root_subsegments"   # or None

    @classmethod
    def stage1(cls) -> "FormatSettings":
        return cls(prompt_templates="none", message_format="none", system_prompt="style_and_length",
                   multi_annotation_weighting=None)

    def __post_init__(self):
        _check_choice("prompt_templates", self.prompt_templates, ("uber_model", "none"))
        _check_choice("message_format", self.message_format, ("role", "none"))
        _check_choice("system_prompt", self.system_prompt, ("demo_or_style", "style", "style_and_length", "none"))
        _check_choice("multi_annotation_weighting", self.multi_annotation_weighting, ("root_subsegments", None))


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"FormatSettings.{name}={value!r}; choose one of {allowed}")


def _field(conv: dict, key: str):
    if key not in conv:
        raise FormatError(f"conversation with style {conv.get('style')!r} has no {key!r} "
                          f"(keys: {sorted(conv)})")
    return conv[key]


# ----------------------------------------------------------------------------------------------
# Targets

def most_frequent_answer(answers, rng: np.random.Generator) -> str:
    """Multi-reference VQA: the most frequent annotator answer, ties broken at random."""
    if not len(answers):
        raise FormatError("'answers' is empty")
    counts = collections.Counter(answers)
    best = max(counts.values())
    tied = [a for a, c in counts.items() if c == best]
    return tied[int(rng.integers(len(tied)))] if len(tied) > 1 else tied[0]


def _points_percent(conv: dict, image_size):
    from molmo_jax import points as points_lib  # owned by the points module; imported lazily

    pts = np.asarray(_field(conv, "points"), np.float64).reshape(-1, 2)
    scale = conv.get("point_scale", 0)
    if pts.shape[0] and not scale:  # pixels -> percent of the image size
        if image_size is None:
            raise FormatError("pixel points need the image size")
        w, h = image_size
        pts = points_lib.pixels_to_percent(pts, w, h)
    elif pts.shape[0] and float(scale) != 100.0:
        raise FormatError(f"point_scale must be 100 (percent) or 0 (pixels), got {scale!r}")
    return pts, points_lib


def pointing_target(conv: dict, image_size) -> str:
    """`<point .../>` / `<points .../>` text (counting: 'Counting the ... shows a total of N.')."""
    label = str(_field(conv, "label")).lower()
    pts, points_lib = _points_percent(conv, image_size)
    if pts.shape[0] == 0:
        return NONE_FOUND
    text = points_lib.points_to_text(pts, label, label)
    if conv["style"] == "point_count":
        return f"Counting the {text} shows a total of {pts.shape[0]}."
    return text


def _choices(conv: dict):
    """(prompt, target) of a multiple-choice question (docs/architecture.md#prompt-formatting)."""
    options = [str(o) for o in conv["options"]]
    answer = _field(conv, "answer")
    if isinstance(answer, (int, np.integer)):
        k = int(answer)
    elif answer in options:
        k = options.index(answer)
    else:
        raise FormatError(f"multiple-choice answer {answer!r} is not one of the options {options}")
    if not 0 <= k < len(options):
        raise FormatError(f"multiple-choice answer index {k} is out of range for {len(options)} options")
    question = str(_field(conv, "question"))
    if conv["style"] in NO_LETTER_STYLES:
        return question + "\n" + "\n".join(options) + "\n", options[k]
    letters = [chr(ord("A") + i) for i in range(len(options))]
    listed = "\n".join(f"{letter}: {opt}" for letter, opt in zip(letters, options))
    return question + "\n" + listed + "\n", letters[k]


# ----------------------------------------------------------------------------------------------
# Turns

def _template_prompt(style: str, conv: dict, rng, settings: FormatSettings) -> str:
    if settings.prompt_templates == "none":
        return ""
    options = templates.TEMPLATES.get(style)
    if options is None:
        raise FormatError(f"style {style!r} has no prompt templates and the conversation has no "
                          "'question' or 'prompt'")
    prompt = options[int(rng.integers(len(options)))]
    return prompt.format(label=str(conv.get("label", "")).lower()) if "{label}" in prompt else prompt


def conversation_turns(conv: dict, rng, settings: FormatSettings, image_size=None) -> list[str]:
    """[user, assistant, ...] turns before the style prefix and role formatting. A target that
    cannot be built (no answer) is left out, which is fine at inference."""
    style = _field(conv, "style")
    if "messages" in conv:
        return [str(m) for m in conv["messages"]]
    if style in ("pointing", "point_count"):
        prompt = conv["question"] if conv.get("question") else _template_prompt(style, conv, rng, settings)
        return [prompt] + ([pointing_target(conv, image_size)] if "points" in conv else [])
    if "options" in conv:
        return list(_choices(conv))
    if "prompt" in conv:
        prompt = str(conv["prompt"])
    elif "question" in conv:
        prompt = str(conv["question"])
    else:
        prompt = _template_prompt(style, conv, rng, settings)
    if "answer" in conv:
        return [prompt, str(conv["answer"])]
    if "answers" in conv:
        return [prompt, most_frequent_answer(list(conv["answers"]), rng)]
    if "text" in conv:
        return [prompt, str(conv["text"])]
    return [prompt]


def style_prefix(style: str, turns: list[str], rng, settings: FormatSettings, for_inference: bool) -> str | None:
    """The system prompt put in front of the first user turn, or None (docs/architecture.md#prompt-formatting)."""
    kind = settings.system_prompt
    style = STYLE_ALIASES.get(style, style)
    if kind == "none":
        return None
    if kind == "style":
        return f"{style}:"
    if kind == "demo_or_style":
        if style in NO_PREFIX_STYLES:
            return None
        if style in DEMO_STYLES:
            return None if rng.random() > 0.1 else f"{style}:"
        return f"{style}:"
    # style_and_length: a length hint (in units of 15 characters) of the target text.
    if for_inference:
        return f"{style} {settings.default_inference_len}:"
    if rng.random() > 0.1:
        target = turns[1] if len(turns) > 1 else ""
        n = len(target) + int(rng.normal(scale=25))
        return f"{style} {n // 15}:"
    return f"{style} :"


def format_conversation(conv: dict, rng: np.random.Generator, settings: FormatSettings = FormatSettings(),
                        for_inference: bool = False, image_size=None) -> list[str]:
    """Message strings of one conversation: user turns at even, assistant turns at odd indices.
    `image_size` (w, h) converts pixel points of pointing targets to percent."""
    if not isinstance(conv, dict):
        raise FormatError(f"a conversation must be a dict, got {type(conv).__name__}")
    turns = conversation_turns(conv, rng, settings, image_size)
    if for_inference:
        if len(turns) % 2 == 0:
            turns = turns[:-1]  # drop the final answer: the model generates it
    elif len(turns) < 2 or len(turns) % 2:
        raise FormatError(f"training conversation with style {conv.get('style')!r} needs a target "
                          f"(user/assistant turns in pairs); got {len(turns)} turn(s)")
    prefix = style_prefix(conv["style"], turns, rng, settings, for_inference)
    if prefix is not None:
        turns[0] = f"{prefix} {turns[0]}" if turns[0] else prefix
    out = []
    for k, msg in enumerate(turns):
        if settings.message_format == "role" and k % 2 == 0:
            msg = f"User: {msg} Assistant:"
        if k > 0 or settings.always_start_with_space:
            msg = " " + msg
        out.append(msg)
    return out
