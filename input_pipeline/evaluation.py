"""Evaluation examples: one conversation per example, the user turn only, ground truth in `metadata`.

    for ex in make_eval_examples("synthetic_pointing", "test"):
        inputs = preprocessor(ex, for_inference=True, seed=ex["metadata"]["seed"])
        ...  # generate, then score against ex["metadata"]

Two kinds of names:

1. Synthetic PixMo tasks (built under `data_dir` first if absent, as the training loader does):

| name | conversation | metadata (besides example_id, image_size = [w, h], seed) |
|---|---|---|
| synthetic_pointing | {style: pointing, label} | task "pointing", points [[x, y], ...] in pixels, image_width, image_height, mask: one [x, y, w, h] box per point (the shape's bounding box) |
| synthetic_counting | {style: point_count, label} | task "counting", count |
| synthetic_qa | {style: user_qa, question} | task "exact", answers [answer] |
| synthetic_clocks | {style: clocks, question} | task "clock", answers ["H:MM"], hour, minute |
| synthetic_charts | {style: pixmo_docs_charts, question} | task "exact", answers [answer] |

2. Datasets built with `python -m tools.build_data` (registry names of `input_pipeline.datasets`, the
   original's evaluation names in EVAL_ALIASES, or `vqa:<name>` for any set built with the vqa builder).
   Records are converted exactly as for training (`DatasetSpec.convert`), then every conversation
   becomes one example: its prompt fields only (style + question, style + label for pointing, the
   options for multiple choice) and its ground truth in `metadata` (besides example_id =
   "split/record/conversation", task, dataset, style, image_size, seed, and question or label):

| task (METRICS) | metadata |
|---|---|
| vqa, vqa_plain, anls, relaxed, exact, clock | answers [str, ...] (clock: also hour, minute) |
| mc | answers [index of the correct option], options [str, ...] |
| pointing | points [[x, y], ...] in pixels of the decoded image, image_width, image_height (no masks: hits within 5% of the diagonal) |
| counting | count |

The metadata keys match what `python -m tools.eval score --task TASK` reads from a predictions file.
Examples come in record order, then conversation order; `seed` (stable per example) makes the prompt
template and the 10% style prefix of demo styles deterministic.
"""
from __future__ import annotations

import collections
import re
import zlib
from collections.abc import Iterator

import numpy as np

from molmo_jax.metrics import tasks

TASKS = {  # name: (style of the conversations, tools.eval task)
    "synthetic_pointing": ("pointing", "pointing"),
    "synthetic_counting": ("point_count", "counting"),
    # One reference answer each: exact match (VQA accuracy needs 3 agreeing references for a 1).
    "synthetic_qa": ("user_qa", "exact"),
    "synthetic_clocks": ("clocks", "clock"),
    "synthetic_charts": ("pixmo_docs_charts", "exact"),
}

# Built datasets -> tools.eval task (docs/architecture.md#metrics). The original names no metric for TallyQA, TabMWP,
# DVQA, FigureQA, PlotQA and PixMo-Docs: short numeric/word answers, so VQA accuracy (TallyQA counts)
# and relaxed accuracy (chart/table answers, exact match for words) are used.
METRICS = {
    "coco_2014_vqa_multi": "vqa", "text_vqa": "vqa", "okvqa": "vqa", "tally_qa": "vqa",
    "a_okvqa_da": "vqa_plain",
    "chart_qa_weighted": "relaxed", "tabwmp_da": "relaxed", "dv_qa": "relaxed", "figure_qa": "relaxed",
    "plot_qa": "relaxed", **{f"pixmo_docs_{s}": "relaxed" for s in ("charts", "tables", "diagrams", "other")},
    "doc_qa": "anls", "info_qa": "anls", "st_qa": "anls",
    "ai2_diagram_v2_mix_transparent": "mc", "a_okvqa_mc": "mc", "science_qa_img": "mc",
    "pixmo_points": "pointing", "pixmo_points_high_freq": "pointing", "pixmo_count": "pointing",
    "pixmo_points_counting": "counting", "pixmo_points_high_freq_counting": "counting",
    "pixmo_count_counting": "counting",
    "pixmo_clocks": "clock",
}
# The original's evaluation names -> the mixture names the sets are built under.
EVAL_ALIASES = {"vqa2": "coco_2014_vqa_multi", "coco_2014_vqa": "coco_2014_vqa_multi",
                "chart_qa": "chart_qa_weighted", "ai2_diagram": "ai2_diagram_v2_mix_transparent",
                "science_qa": "science_qa_img"}
# For sets built under another name (vqa:<name>): the task follows the conversation's style.
STYLE_METRICS = {
    "vqa2": "vqa", "text_vqa": "vqa", "okvqa": "vqa", "tally_qa": "vqa", "a_okvqa_da": "vqa_plain",
    "chart_qa": "relaxed", "tabwmp_da": "relaxed", "dv_qa": "relaxed", "figure_qa": "relaxed", "plot_qa": "relaxed",
    "doc_qa": "anls", "info_qa": "anls", "st_qa": "anls",
    "ai2_diagram": "mc", "ai2_diagram_no_letter": "mc", "a_okvqa_mc": "mc", "science_qa": "mc",
    "pointing": "pointing", "point_count": "counting", "clocks": "clock",
}


class EvalDataError(ValueError):
    """An evaluation dataset that cannot be read (unknown, not built, no such split); the message says why."""


class UnknownEvalDataset(EvalDataError, KeyError):
    """A name that is no evaluation dataset (a KeyError too, as callers of the synthetic tasks expect)."""

    def __str__(self):  # KeyError would print the message in quotes
        return str(self.args[0])


def known_names() -> list[str]:
    return [*TASKS, *METRICS, *EVAL_ALIASES]


def _unknown(name: str) -> EvalDataError:
    return UnknownEvalDataset(f"unknown evaluation task {name!r}; known: {', '.join(known_names())}, "
                         "or vqa:<name> for a set built with `python -m tools.build_data vqa --name <name>`")


# ----------------------------------------------------------------------------------------------
# Synthetic PixMo

def _boxes(points, objects) -> list[list[float]]:
    """[x, y, w, h] of the shape under each point (the synthetic shapes sit at the points)."""
    boxes = []
    for x, y in points:
        nearest = min(objects, key=lambda o: (o["x"] - x) ** 2 + (o["y"] - y) ** 2)
        r = float(nearest["radius"])
        boxes.append([float(nearest["x"]) - r, float(nearest["y"]) - r, 2 * r, 2 * r])
    return boxes


def _ground_truth(style: str, conversation: dict, metadata: dict, width: int, height: int) -> dict:
    if style in ("pointing", "point_count"):
        points = np.asarray(conversation["points"], np.float64).reshape(-1, 2)
        if style == "point_count":
            return {"count": int(len(points))}
        return {"points": points.round(2).tolist(), "image_width": width, "image_height": height,
                "mask": _boxes(points, metadata.get("objects") or [])}
    out = {"answers": [str(conversation["answer"])]}
    if style == "clocks":
        out.update(hour=int(metadata["hour"]), minute=int(metadata["minute"]))
    return out


def _prompt_only(conversation: dict) -> dict:
    """The conversation without its target: what the model sees at inference."""
    keep = ("style", "label", "question") if "label" in conversation else ("style", "question")
    return {k: conversation[k] for k in keep if k in conversation}


def _synthetic_examples(name, split, data_dir, limit, split_sizes, options) -> Iterator[dict]:
    from input_pipeline import datasets

    folder = datasets.ensure_synthetic(data_dir or datasets.default_data_dir(), split_sizes, options)
    return _read_synthetic(name, _open(folder, split), split, limit)


def _read_synthetic(name, source, split, limit) -> Iterator[dict]:
    from input_pipeline.builders.synthetic import load_example

    style, task = TASKS[name]
    records = sorted((load_example(source[i]) for i in range(len(source))), key=lambda e: e["metadata"]["index"])
    produced = 0
    for example in records:
        meta = example["metadata"]
        height, width = example["image"].shape[:2]
        for k, conversation in enumerate(example["message_list"]):
            if conversation["style"] != style:
                continue
            if limit is not None and produced >= limit:
                return
            example_id = f"{split}/{meta['index']}/{k}"
            metadata = {"example_id": example_id, "task": task, "image_size": [width, height],
                        "seed": zlib.crc32(f"{name}/{example_id}".encode()), "kind": meta["kind"]}
            metadata.update(_ground_truth(style, conversation, meta, width, height))
            yield {"image": example["image"], "message_list": [_prompt_only(conversation)], "metadata": metadata}
            produced += 1


def _open(folder, split: str):
    from input_pipeline import datasets

    try:
        return datasets.open_source(folder, split)
    except KeyError as error:  # the message names the splits the dataset has
        raise EvalDataError(str(error.args[0])) from None


# ----------------------------------------------------------------------------------------------
# Built datasets

def _spec(name: str):
    from input_pipeline import datasets

    try:
        return datasets.spec(name)  # also resolves the mixtures' legacy aliases
    except KeyError:
        raise _unknown(name) from None


def _resolve(name: str, data_dir: str):
    """(DatasetSpec, folder) of a built dataset; EvalDataError saying how to build it. An original
    evaluation name (EVAL_ALIASES) is looked for under its mixture name, then as vqa:<name>."""
    from input_pipeline import datasets

    candidates = [EVAL_ALIASES[name], f"vqa:{name}"] if name in EVAL_ALIASES else [name]
    specs = [_spec(candidate) for candidate in candidates]
    for spec in specs:
        folder = datasets.dataset_dir(data_dir, spec)
        if folder is not None:
            return spec, folder
    raise EvalDataError(f"dataset {name!r} is not built under {data_dir!r}; build it with: "
                        f"{datasets.build_command(data_dir, specs[0])}")


def task_of(name: str, conversation: dict, metric: str | None = None) -> str | None:
    """The tools.eval task scoring `conversation` of registry dataset `name` (None: no metric known)."""
    if metric:
        return metric
    base = name[4:] if name.startswith("vqa:") else name
    task = METRICS.get(name) or METRICS.get(EVAL_ALIASES.get(base, base))
    task = task or STYLE_METRICS.get(str(conversation.get("style")))
    if task is None and name.startswith("vqa:"):  # any other VQA-style set: by its fields
        task = "mc" if "options" in conversation else "vqa"
    return task


class _Skip(Exception):
    """A conversation that gives no evaluation example; the message is the reason counted."""


def _mc_index(conversation: dict) -> int:
    options, answer = [str(o) for o in conversation["options"]], conversation.get("answer")
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool) and 0 <= int(answer) < len(options):
        return int(answer)
    if isinstance(answer, str) and answer in options:
        return options.index(answer)
    raise _Skip("multiple-choice answer not among the options")


def _built_ground_truth(task: str, conv: dict, meta: dict, width: int, height: int) -> tuple[dict, dict]:
    """(prompt conversation, ground truth) of one conversation of a converted record."""
    from molmo_jax import points as points_lib

    style = conv["style"]
    if task in ("pointing", "counting"):
        if "label" not in conv and "question" not in conv:
            raise _Skip(f"style {style!r} has no label or question to point at")
        prompt = {k: conv[k] for k in ("style", "label", "question") if k in conv}
        points = np.asarray(conv.get("points", []), np.float64).reshape(-1, 2)
        if task == "counting":
            return prompt, {"count": int(meta["count"]) if "count" in meta else int(len(points))}
        if not len(points) and meta.get("count"):  # PixMo-Count validation/test: counts without points
            raise _Skip("no points, only a count (evaluate the counting variant)")
        if len(points) and float(conv.get("point_scale", 0)) == 100.0:
            points = points_lib.percent_to_pixels(points, width, height)
        return prompt, {"points": points.round(2).tolist(), "image_width": width, "image_height": height,
                        "label": str(conv.get("label", ""))}
    if "messages" in conv or ("question" not in conv and "prompt" not in conv):
        raise _Skip(f"style {style!r}: not a single question")
    text = "prompt" if "prompt" in conv else "question"
    prompt = {"style": style, text: conv[text]}
    truth = {"question": str(conv[text])}
    if "options" in conv:  # kept in the prompt: the formatter lists them as in training (docs/architecture.md#prompt-formatting)
        k = _mc_index(conv)
        prompt.update(options=list(conv["options"]), answer=k)
        if task == "mc":
            return prompt, dict(truth, answers=[k], options=[str(o) for o in conv["options"]])
        truth["answers"] = [str(conv["options"][k])]
        return prompt, truth
    answers = conv.get("answers") or ([conv["answer"]] if conv.get("answer") not in (None, "") else [])
    if not answers:
        raise _Skip("no reference answer")
    truth["answers"] = [str(a) for a in answers]
    if task == "clock":
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", truth["answers"][0].strip())
        if match:
            truth.update(hour=int(match.group(1)), minute=int(match.group(2)))
    return prompt, truth


def _built_examples(name, split, data_dir, limit, metric, skipped) -> Iterator[dict]:
    """Checks the dataset and split now (errors before any generation starts), reads lazily."""
    from input_pipeline import datasets

    data_dir = data_dir or datasets.default_data_dir()
    registry_name = _spec(EVAL_ALIASES.get(name, name)).name
    if metric is None and registry_name not in METRICS and not registry_name.startswith("vqa:"):
        raise EvalDataError(f"dataset {name!r} has no evaluation metric (captions, dialogues or actions); "
                            f"evaluable: {', '.join(known_names())}; or choose one with --metric")
    spec, folder = _resolve(name, data_dir)
    if split is None:  # the test split if there is one (the PixMo sets only have train/validation)
        import tensorflow_datasets as tfds
        split = "test" if "test" in tfds.builder_from_directory(str(folder)).info.splits else "validation"
    return _read_built(spec, _open(folder, split), split, limit, metric, skipped)


def _read_built(spec, source, split, limit, metric, skipped) -> Iterator[dict]:
    from input_pipeline import conversions
    from molmo_jax.preprocess import ImageError, load_image

    resolved, produced = spec.name, 0
    for index in range(len(source)):
        seed = zlib.crc32(f"{resolved}/{split}/{index}".encode())
        try:
            example = spec.convert(source[index], np.random.default_rng(seed), collections.Counter())
            image = load_image(example["image"])
        except (conversions.BadRecord, ImageError) as error:
            skipped[f"record skipped: {error}"] += 1
            continue
        height, width = image.shape[:2]
        for k, conv in enumerate(example["message_list"]):
            task = task_of(resolved, conv, metric)
            try:
                prompt, truth = _built_ground_truth(task, conv, example["metadata"], width, height)
            except _Skip as reason:
                skipped[str(reason)] += 1
                continue
            if limit is not None and produced >= limit:
                return
            example_id = f"{split}/{index}/{k}"
            metadata = {"example_id": example_id, "task": task, "dataset": resolved, "style": conv["style"],
                        "image_size": [width, height], "seed": zlib.crc32(f"{resolved}/{example_id}".encode()),
                        **truth}
            yield {"image": image, "message_list": [prompt], "metadata": metadata}
            produced += 1


def make_eval_examples(name: str, split: str | None = "test", data_dir: str | None = None, limit: int | None = None,
                       split_sizes: dict[str, int] | None = None, options=None, metric: str | None = None,
                       skipped: collections.Counter | None = None) -> Iterator[dict]:
    """Inference examples of `name` (see the module docstring) from its `split`.

    split None: "test" (built sets without one: "validation"). `metric` overrides the task of built
    sets (one of tasks.TASKS). `skipped` counts conversations left out, by reason. Raises
    EvalDataError right away for an unknown or unbuilt dataset or a missing split.
    """
    if metric is not None and metric not in tasks.TASKS:
        raise EvalDataError(f"unknown metric {metric!r}; choose one of {', '.join(tasks.TASKS)}")
    if name in TASKS:
        if metric is not None:
            raise EvalDataError(f"{name} is scored as {TASKS[name][1]!r}; --metric is for built datasets only")
        return _synthetic_examples(name, split or "test", data_dir, limit, split_sizes, options)
    if name.startswith("synthetic_"):
        raise _unknown(name)
    return _built_examples(name, split, data_dir, limit, metric,
                           skipped if skipped is not None else collections.Counter())
