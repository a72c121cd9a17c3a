"""Evaluation examples: one conversation per example, the user turn only, ground truth in `metadata`.

    for ex in make_eval_examples("synthetic_pointing", "test"):
        inputs = preprocessor(ex, for_inference=True, seed=ex["metadata"]["seed"])
        ...  # generate, then score against ex["metadata"]

Tasks on the synthetic PixMo (built under `data_dir` first if absent, as the training loader does):

| name | conversation | metadata (besides example_id, image_size = [w, h], seed) |
|---|---|---|
| synthetic_pointing | {style: pointing, label} | task "pointing", points [[x, y], ...] in pixels, image_width, image_height, mask: one [x, y, w, h] box per point (the shape's bounding box) |
| synthetic_counting | {style: point_count, label} | task "counting", count |
| synthetic_qa | {style: user_qa, question} | task "vqa", answers [answer] |
| synthetic_clocks | {style: clocks, question} | task "clock", answers ["H:MM"], hour, minute |
| synthetic_charts | {style: pixmo_docs_charts, question} | task "vqa", answers [answer] |

The metadata keys match what `python -m tools.eval score --task TASK` reads from a predictions file.
Examples come in order of (image index, conversation index); `seed` (stable per example) makes the
prompt template and the 10% style prefix deterministic.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

TASKS = {  # name: (style of the conversations, tools.eval task)
    "synthetic_pointing": ("pointing", "pointing"),
    "synthetic_counting": ("point_count", "counting"),
    "synthetic_qa": ("user_qa", "vqa"),
    "synthetic_clocks": ("clocks", "clock"),
    "synthetic_charts": ("pixmo_docs_charts", "vqa"),
}


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


def make_eval_examples(name: str, split: str = "test", data_dir: str | None = None, limit: int | None = None,
                       split_sizes: dict[str, int] | None = None, options=None) -> Iterator[dict]:
    """Inference examples of task `name` (table above) from the synthetic PixMo's `split`."""
    from input_pipeline import datasets
    from input_pipeline.builders.synthetic import load_example

    if name not in TASKS:
        raise KeyError(f"unknown evaluation task {name!r}; choose one of {', '.join(TASKS)}")
    style, task = TASKS[name]
    folder = datasets.ensure_synthetic(data_dir or datasets.default_data_dir(), split_sizes, options)
    source = datasets.open_source(folder, split)
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
