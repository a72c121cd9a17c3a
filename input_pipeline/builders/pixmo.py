"""TFDS builders of the PixMo datasets from a local copy of their Hub files (docs/architecture.md#pixmo-datasets).

    python -m tools.build_data pixmo_points --subset basic --data-dir DIR --source HUB --images IMAGES

One class per Hub dataset; the record schema and the shared rules (file discovery, image checks,
grouping, validation split) are in `hub.py`. What each stores in `annotations` (Hub column names):

| builder | one record per | annotations | points |
|---|---|---|---|
| pixmo_cap | Hub row | caption, transcripts | - |
| pixmo_ask_model_anything | image | question[], answer[] | - |
| pixmo_cap_qa | image | messages[] (each [user, assistant, ...]) | - |
| pixmo_points (subset basic / high_frequency) | image | label[], points[], count[] | percent |
| pixmo_count | Hub row | label, points, count | pixels |
| pixmo_point_explanations | half of an image's questions | question[], parsed_response[], alt_text[], inline_text[], points[] | percent |
| pixmo_docs (subset charts / tables / diagrams / other) | image | image_id, questions [{question, answer}] | - |
| pixmo_clocks | Hub row | the metadata columns | - |

Prompts, templates and the "how many" prefixes are applied later, by the loader (`conversions.py`),
so that both training stages reuse the same records.
"""
from __future__ import annotations

import pathlib
import re

import tensorflow_datasets as tfds

from input_pipeline.builders import hub
from input_pipeline.builders.base import BuildArgumentError
from input_pipeline.builders.hub import SkipRecord

POINT_PLACEHOLDER = "<|POINT|>"
PERCENT, PIXELS = "percent (point_scale 100)", "pixels (point_scale 0)"


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _with_subset_option(parser, configs, what: str):
    parser.add_argument_group(what).add_argument(
        "--subset", choices=[c.name for c in configs], default=configs[0].name,
        help=f"which subset to build (default %(default)s)")


class PixmoCap(hub.HubBuilder):
    """PixMo-Cap: long captions and the spoken transcripts they were written from."""
    VERSION = tfds.core.Version("1.0.0")
    REPO, COLUMNS, N_VAL = "pixmo-cap", ("image_url", "caption", "transcripts"), 2048

    def clean_row(self, row):
        if not _text(row.get("caption")):
            raise SkipRecord("empty or missing caption")
        row["caption"] = row["caption"].strip()
        row["transcripts"] = [t.strip() for t in row.get("transcripts") or [] if _text(t)]
        return row


class PixmoAskModelAnything(hub.HubBuilder):
    """PixMo-AskModelAnything: human questions with model-assisted answers, grouped per image."""
    VERSION = tfds.core.Version("1.0.0")
    REPO, N_VAL = "pixmo-ask-model-anything", 2048
    COLUMNS = ("image_url", "image_sha256", "question", "answer")
    GROUPED, SHA_CHECK = True, True

    def clean_row(self, row):
        if not _text(row.get("question")) or not _text(row.get("answer")):
            raise SkipRecord("annotation with an empty question or answer")
        return row


_TURN_MARK = re.compile(r"\[(USER|ASSISTANT)\]")


def dialogue_turns(question: str, answer: str) -> list[str]:
    """'[USER] q1 [ASSISTANT] a1 [USER] q2 [ASSISTANT]' + answer -> [q1, a1, q2, answer]."""
    pieces = _TURN_MARK.split(question or "")
    if pieces[0].strip():
        raise SkipRecord("annotation with an unreadable dialogue")
    roles, texts = pieces[1::2], [p.strip() for p in pieces[2::2]]
    expected = ["USER", "ASSISTANT"] * (len(roles) // 2)
    if not roles or roles != expected or texts[-1] or not all(texts[:-1]):
        raise SkipRecord("annotation with an unreadable dialogue")
    return texts[:-1] + [answer.strip()]


class PixmoCapQa(hub.HubBuilder):
    """PixMo-CapQA: LLM-written dialogues about captioned images, grouped per image."""
    VERSION = tfds.core.Version("1.0.0")
    REPO, N_VAL, GROUPED = "pixmo-cap-qa", 2048, True
    COLUMNS = ("image_url", "question", "answer")
    OPTIONAL_COLUMNS = ("messages",)

    def clean_row(self, row):
        messages = row.get("messages")
        if messages and len(messages) % 2 == 0 and all(_text(m) for m in messages):
            turns = [m.strip() for m in messages]
        else:  # no usable `messages` column: parse the serialised dialogue
            if not _text(row.get("answer")):
                raise SkipRecord("annotation with an empty question or answer")
            turns = dialogue_turns(row.get("question"), row["answer"])
        return {"image_url": row["image_url"], "messages": turns}

    def annotations(self, rows):
        return {"messages": [row["messages"] for row in rows]}


_POINTS_SUBSETS = [tfds.core.BuilderConfig(name="basic", description="collection_method 'pointing'"),
                   tfds.core.BuilderConfig(name="high_frequency", description="collection_method 'counting'")]


class PixmoPoints(hub.HubBuilder):
    """PixMo-Points: labels with every instance clicked (percent coordinates), grouped per image.

    Images of allenai/pixmo-points-eval are held out when its parquet file is under --source.
    """
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = _POINTS_SUBSETS
    REPO, N_VAL, GROUPED, SHA_CHECK = "pixmo-points", 2048, True, True
    COLUMNS = ("image_url", "image_sha256", "points", "count", "label", "collection_method")
    EVAL_REPO = "pixmo-points-eval"

    @classmethod
    def add_arguments(cls, parser):
        _with_subset_option(parser, _POINTS_SUBSETS, "pixmo_points")

    @classmethod
    def extra_builder_kwargs(cls, args):
        return {"config": args.subset}

    def _metadata(self):
        return dict(super()._metadata(), point_scale=PERCENT)

    def _eval_urls(self) -> set[str]:
        """Image URLs of pixmo-points-eval under --source (empty if its file is not there)."""
        if not hasattr(self, "_eval_url_set"):
            eval_files = hub.find_parquet_files(self.source, self.EVAL_REPO, "test", strict=True)
            self._eval_url_set = {r["image_url"] for r in hub.read_rows(eval_files, ("image_url",))}
        return self._eval_url_set

    def keep_row(self, row):
        wanted = "pointing" if self.builder_config.name == "basic" else "counting"
        return row.get("collection_method") == wanted

    def _hub_records(self, hub_split):
        # The hold-out happens before the validation split, as in the original.
        records = super()._hub_records(hub_split)
        held_out = self._eval_urls()
        kept = [r for r in records if r[1] not in held_out]
        self.info.metadata["eval_holdout"] = {"applied": bool(held_out), "eval_images": len(held_out),
                                              "removed_images": len(records) - len(kept)}
        return kept

    def clean_row(self, row):
        if not _text(row.get("label")):
            raise SkipRecord("annotation with an empty label")
        row["points"] = hub.point_pairs(row.get("points"))
        return row

    def annotations(self, rows):
        return hub.columns_as_lists(rows, ("label", "points", "count"))


class PixmoCount(hub.HubBuilder):
    """PixMo-Count: one object label per row with its count; pixel points (train only)."""
    VERSION = tfds.core.Version("1.0.0")
    REPO, HUB_SPLITS = "pixmo-count", ("train", "validation", "test")
    COLUMNS = ("image_url", "count", "label")
    OPTIONAL_COLUMNS = ("points",)

    def _metadata(self):
        return dict(super()._metadata(), point_scale=PIXELS)

    def clean_row(self, row):
        if not _text(row.get("label")):
            raise SkipRecord("empty label")
        if row.get("count") is None or int(row["count"]) < 0:
            raise SkipRecord("missing or negative count")
        row["points"] = hub.point_pairs(row.get("points"))
        return row


class PixmoPointExplanations(hub.HubBuilder):
    """PixMo-Point-Explanations: answers with inline points; an image with n > 1 questions gives two
    records, its first ceil(n/2) questions and the rest (docs/architecture.md#pixmo-datasets)."""
    VERSION = tfds.core.Version("1.0.0")
    REPO, N_VAL, GROUPED, SHA_CHECK = "pixmo-point-explanations", 1024, True, True
    COLUMNS = ("image_url", "image_sha256", "question", "parsed_response", "alt_text", "inline_text", "points")

    def _metadata(self):
        return dict(super()._metadata(), point_scale=PERCENT)

    def clean_row(self, row):
        response = row.get("parsed_response")
        if response is None:
            raise SkipRecord("annotation without parsed_response")
        if not _text(row.get("question")):
            raise SkipRecord("annotation with an empty question")
        alts, inlines, points = row.get("alt_text") or [], row.get("inline_text") or [], row.get("points") or []
        if not response.count(POINT_PLACEHOLDER) == len(alts) == len(inlines) == len(points):
            raise SkipRecord("annotation whose <|POINT|> placeholders do not match its points")
        row["points"] = [hub.point_pairs(p) for p in points]
        return row

    def annotations(self, rows):
        return hub.columns_as_lists(rows, ("question", "parsed_response", "alt_text", "inline_text", "points"))

    def _source_records(self, split, skips):
        for key, url, data, sha, ann in super()._source_records(split, skips):
            n = len(ann["question"])
            if n == 1:
                yield key, url, data, sha, dict(ann, part=0)
                continue
            first = (n + 1) // 2
            for part, rows in enumerate((slice(0, first), slice(first, n))):
                yield f"{key}#{part}", url, data, sha, dict({k: v[rows] for k, v in ann.items()}, part=part)


_DOCS_SUBSETS = [tfds.core.BuilderConfig(name=n, description=f"pixmo-docs config {n!r}")
                 for n in ("charts", "tables", "diagrams", "other")]


class PixmoDocs(hub.HubBuilder):
    """PixMo-Docs: rendered charts, tables, diagrams and documents with Q/A pairs; images are in the parquet."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = _DOCS_SUBSETS
    REPO, HUB_SPLITS, NEEDS_IMAGES = "pixmo-docs", ("train", "validation"), False
    COLUMNS = ("image", "image_id", "questions")

    @classmethod
    def add_arguments(cls, parser):
        _with_subset_option(parser, _DOCS_SUBSETS, "pixmo_docs")

    @classmethod
    def extra_builder_kwargs(cls, args):
        return {"config": args.subset}

    def source_files(self, hub_split):
        return hub.find_parquet_files(self.source, self.REPO, hub_split, config=self.builder_config.name)

    def _split_records(self, split):
        # Streamed, never cached: the rows carry the image bytes (GBs for `charts`).
        rows = hub.read_rows(self.source_files(split), self.COLUMNS)
        return ((f"{i:09d}", "", [row]) for i, row in enumerate(rows))

    def clean_row(self, row):
        questions = row.get("questions") or []
        if isinstance(questions, dict):  # a dict of lists, as HF `datasets` reads a sequence of structs
            questions = [dict(zip(questions, values)) for values in zip(*questions.values())]
        pairs = [{"question": q["question"].strip(), "answer": q["answer"].strip()} for q in questions
                 if _text(q.get("question")) and _text(q.get("answer"))]
        if not pairs:
            raise SkipRecord("no question with a non-empty answer")
        row["questions"] = pairs
        return row

    def image_bytes(self, url, rows):
        return hub.embedded_image_bytes(rows[0].get("image"))

    def annotations(self, rows):
        return {"image_id": rows[0].get("image_id"), "questions": rows[0]["questions"]}


class PixmoClocks(hub.HubBuilder):
    """PixMo-Clocks: the Hub holds only metadata (watch face, time); the images must be rendered by the
    user (facer.io watch faces, not reproducible here) into --images as <example_id>.png/.jpg.
    Rows without a rendered image are skipped and counted."""
    VERSION = tfds.core.Version("1.0.0")
    REPO, HUB_SPLITS = "pixmo-clocks", ("train", "validation")
    COLUMNS = ("example_id",)
    OPTIONAL_COLUMNS = ("watch_time", "hour", "minute", "second", "time_format", "shows_seconds",
                        "watchface_id", "watchface_name", "hour_visible", "minute_visible", "second_visible", "text")
    EXTENSIONS = ("", ".png", ".jpg", ".jpeg", ".webp")

    def check_source(self):
        super().check_source()
        for split in self.HUB_SPLITS:
            for path in self.source_files(split):
                names = set(hub.pq_schema_names(path))
                if "watch_time" not in names and not {"hour", "minute"} <= names:
                    raise BuildArgumentError(f"{path}: needs a `watch_time` column (or `hour` and `minute`); "
                                             f"it has {sorted(names)}")

    def _split_records(self, split):
        rows = hub.read_rows(self.source_files(split), self.COLUMNS + self.OPTIONAL_COLUMNS)
        return [(str(row["example_id"]), "", [row]) for row in rows]

    def clean_row(self, row):
        if not _text(row.get("watch_time")) and (row.get("hour") is None or row.get("minute") is None):
            raise SkipRecord("no time given")
        return row

    def _rendered(self, rows):
        example_id = str(rows[0]["example_id"])
        for extension in self.EXTENSIONS:
            path = pathlib.Path(self.images) / f"{example_id}{extension}"
            if path.is_file():
                return path
        return None

    def image_bytes(self, url, rows):
        path = self._rendered(rows)
        if path is None:
            raise SkipRecord("no rendered image (PixMo-Clocks ships metadata only)")
        return path.read_bytes()
