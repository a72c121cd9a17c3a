"""The synthetic PixMo renderer: determinism, split separation, the example contract, and that the
annotations agree with the pixels (points land on shapes of the named colour, clock hands and bars are
where the answers say)."""
import collections
import dataclasses
import math
import re

import numpy as np
import pytest

from input_pipeline import synthetic
from input_pipeline.synthetic import COLOURS, SHAPES, SyntheticOptions, render_example

OPTIONS = SyntheticOptions()
TEXT_FIELDS = {"long_caption": ("text",), "transcript": ("text",), "user_qa": ("question", "answer"),
               "clocks": ("question", "answer"), "pixmo_docs_charts": ("question", "answer")}
KIND = re.compile(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")  # "red circle" ("red circles" too)
LABEL = re.compile(rf"^(({'|'.join(COLOURS)}) )?({'|'.join(synthetic._plural(s) for s in SHAPES)})$")


@pytest.fixture(scope="module")
def examples():
    return [render_example(OPTIONS, 0, "train", i) for i in range(80)]


def _near(pixel, colour, tolerance=40):
    return np.abs(pixel.astype(int) - np.asarray(colour)).max() <= tolerance


def test_same_seed_gives_identical_examples():
    for index in (0, 7, 33):
        a, b = render_example(OPTIONS, 3, "validation", index), render_example(OPTIONS, 3, "validation", index)
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["metadata"] == b["metadata"]
        assert len(a["message_list"]) == len(b["message_list"])
        for ca, cb in zip(a["message_list"], b["message_list"]):
            assert ca.keys() == cb.keys()
            for key in ca:
                np.testing.assert_array_equal(ca[key], cb[key])


def test_splits_and_seeds_give_different_images():
    def digests(seed, split):
        return {render_example(OPTIONS, seed, split, i)["image"].tobytes() for i in range(30)}
    train, validation, test = digests(0, "train"), digests(0, "validation"), digests(0, "test")
    assert len(train) == len(validation) == len(test) == 30
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert not (train & digests(1, "train"))


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        render_example(OPTIONS, 0, "dev", 0)


def test_examples_follow_the_contract(examples):
    styles = collections.Counter()
    for example in examples:
        image, meta = example["image"], example["metadata"]
        assert image.dtype == np.uint8 and image.shape == (112, 112, 3)
        assert (meta["width"], meta["height"]) == (112, 112) and meta["kind"] in synthetic.KINDS
        assert [c["style"] for c in example["message_list"][:2]] == ["long_caption", "transcript"]
        for conversation in example["message_list"]:
            style = conversation["style"]
            styles[style] += 1
            if style in ("pointing", "point_count"):
                points = conversation["points"]
                assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 2
                assert conversation["point_scale"] == 0 and LABEL.match(conversation["label"])
                assert np.all((points >= 0) & (points < 112))
            else:
                for field in TEXT_FIELDS[style]:
                    assert isinstance(conversation[field], str) and conversation[field]
    assert set(styles) == {"long_caption", "transcript", "pointing", "point_count", "user_qa", "clocks",
                           "pixmo_docs_charts"}


def test_points_land_on_shapes_of_the_named_colour_and_targets_match(examples):
    n_multi = n_none = 0
    for example in (e for e in examples if e["metadata"]["kind"] == "shapes"):
        objects, image = example["metadata"]["objects"], example["image"]
        targets = {t["conversation"]: t for t in example["metadata"]["point_targets"]}
        for i, conversation in enumerate(example["message_list"]):
            if "points" not in conversation:
                continue
            words = conversation["label"].split()
            colour = words[0] if len(words) == 2 else None
            shape = next(s for s in SHAPES if synthetic._plural(s) == words[-1])
            expected = [o for o in objects if o["shape"] == shape and colour in (None, o["colour"])]
            assert len(conversation["points"]) == len(expected) == targets[i]["count"]
            np.testing.assert_allclose(conversation["points"], np.asarray(targets[i]["points"]).reshape(-1, 2))
            for (x, y), obj in zip(conversation["points"], expected):
                assert (x, y) == pytest.approx((obj["x"], obj["y"]))
                assert _near(image[int(round(y)), int(round(x))], COLOURS[obj["colour"]])
            n_multi += len(expected) > 1
            n_none += not expected
    assert n_multi > 0 and n_none > 0  # multi-point and absent labels both occur


def test_qa_answers_and_captions_agree_with_objects(examples):
    for example in (e for e in examples if e["metadata"]["kind"] == "shapes"):
        objects = example["metadata"]["objects"]
        caption = example["message_list"][0]["text"]
        assert f"shows {synthetic.NUMBER_WORDS[len(objects)]} shape" in caption
        for c in example["message_list"]:
            if c["style"] != "user_qa":
                continue
            q, a = c["question"], c["answer"]
            if q == "How many shapes are there?":
                assert a == str(len(objects))
            elif m := re.match(r"How many (\w+) are there\?", q):
                assert a == str(sum(synthetic._plural(o["shape"]) == m[1] for o in objects))
            elif m := re.match(r"Is there a (\w+) (\w+)\?", q):
                assert a == ("Yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objects) else "No")
            elif m := re.match(r"What colour is the (\w+)\?", q):
                assert [o["colour"] for o in objects if o["shape"] == m[1]] == [a]
            else:
                m = re.match(r"What shape is the (\w+) object\?", q)
                assert m and [o["shape"] for o in objects if o["colour"] == m[1]] == [a]


def test_absent_labels_name_objects_not_in_the_scene():
    options = dataclasses.replace(OPTIONS, kinds=("shapes",), kind_weights=(1.0,), absent_label_rate=1.0)
    for i in range(10):
        example = render_example(options, 0, "test", i)
        present = {f"{o['colour']} {synthetic._plural(o['shape'])}" for o in example["metadata"]["objects"]}
        pointing = [c for c in example["message_list"] if "points" in c]
        assert pointing and all(len(c["points"]) == 0 and c["label"] not in present for c in pointing)
        assert all(t["count"] == 0 for t in example["metadata"]["point_targets"])


def test_clock_answer_matches_the_drawn_minute_hand():
    options = dataclasses.replace(OPTIONS, kinds=("clock",), kind_weights=(1.0,))
    for i in range(12):
        example = render_example(options, 0, "train", i)
        meta, image = example["metadata"], example["image"]
        qa = example["message_list"][2]
        assert qa == {"style": "clocks", "question": "What time is being shown?", "answer": meta["time"]}
        assert re.fullmatch(r"(1[0-2]|[1-9]):[0-5][05]", meta["time"])
        assert meta["time"] == f"{meta['hour']}:{meta['minute']:02d}"
        # Follow the minute hand: the pixels at 70% of the face radius along it are dark (the hand), and
        # in the opposite direction they are the light face (unless the hour hand points there).
        (cx, cy), radius = meta["center"], meta["radius"]
        minute_angle = meta["minute"] * 6
        hour_angle = ((meta["hour"] % 12) + meta["minute"] / 60) * 30
        hour_opposite = abs((minute_angle + 180 - hour_angle + 180) % 360 - 180) < 30
        for sign, dark in ((1, True), (-1, False)):
            if not dark and hour_opposite:
                continue
            a = math.radians(minute_angle - 90)
            x, y = cx + sign * 0.7 * radius * math.cos(a), cy + sign * 0.7 * radius * math.sin(a)
            window = image[round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2].astype(int).sum(-1)
            assert (window.min() < 300) == dark, (meta["time"], sign)


def test_chart_answers_match_the_drawn_bars():
    options = dataclasses.replace(OPTIONS, kinds=("chart",), kind_weights=(1.0,))
    for i in range(10):
        example = render_example(options, 0, "validation", i)
        bars, image = example["metadata"]["bars"], example["image"]
        answers = {c["question"]: c["answer"] for c in example["message_list"][2:]}
        values = [b["value"] for b in bars]
        assert answers["Which bar is the tallest?"] == bars[int(np.argmax(values))]["colour"]
        assert answers["Which bar is the shortest?"] == bars[int(np.argmin(values))]["colour"]
        assert answers["How many bars are there?"] == str(len(bars))
        asked = next(q for q in answers if q.startswith("What is the value"))
        assert answers[asked] == str(next(b["value"] for b in bars if b["colour"] in asked))
        # Each bar is drawn in its colour, from left to right, with a height proportional to its value.
        left, right, bottom, unit = 112 * 0.17, 112 * 0.96, 112 * 0.9, 112 * (0.9 - 0.07) / 10
        slot = (right - left) / len(bars)
        for k, bar in enumerate(bars):
            x = int(left + slot * (k + 0.5))
            assert _near(image[int(bottom - bar["value"] * unit / 2), x], COLOURS[bar["colour"]], 5)
            assert not _near(image[int(bottom - (bar["value"] + 0.5) * unit), x], COLOURS[bar["colour"]], 30)


def test_knobs_image_size_objects_and_kind_mix():
    options = SyntheticOptions(image_size=(160, 96), min_objects=3, max_objects=3, kinds=("shapes", "clock"),
                               kind_weights=(3.0, 1.0))
    examples = [render_example(options, 5, "train", i) for i in range(120)]
    kinds = collections.Counter(e["metadata"]["kind"] for e in examples)
    assert set(kinds) == {"shapes", "clock"} and 70 <= kinds["shapes"] <= 110
    for example in examples:
        assert example["image"].shape == (96, 160, 3)
        if example["metadata"]["kind"] == "shapes":
            assert len(example["metadata"]["objects"]) == 3  # 3 big shapes always fit in 160x96
            xy = np.asarray([[o["x"], o["y"]] for o in example["metadata"]["objects"]])
            assert np.all(xy < [160, 96]) and np.all(xy > 0)


def test_min_types_makes_every_scene_a_choice():
    """min_types=2: every scene with two or more objects holds at least two (colour, shape) kinds;
    the default (1) leaves scenes of one kind common."""
    def kinds_per_scene(options):
        examples = [render_example(options, 3, "train", i) for i in range(150)]
        return [(len(e["metadata"]["objects"]), len({(o["colour"], o["shape"]) for o in e["metadata"]["objects"]}))
                for e in examples if e["metadata"]["kind"] == "shapes"]
    base = SyntheticOptions(grid=4, max_objects=4, kinds=("shapes",), kind_weights=(1.0,))
    assert sum(k == 1 for n, k in kinds_per_scene(base) if n > 1) > 20
    scenes = kinds_per_scene(dataclasses.replace(base, min_types=2))
    assert all(k >= 2 for n, k in scenes if n > 1) and all(k <= 3 for _, k in scenes)


def test_backgrounds_option_limits_the_background_colours():
    options = synthetic.parse_options("grid=4,max_objects=4,backgrounds=light grey+beige,kinds=shapes+clock")
    assert options.backgrounds == ("light grey", "beige")
    names = {render_example(options, 2, "train", i)["metadata"]["background"] for i in range(40)}
    assert names == {"light grey", "beige"}
    # The default draws from every background, with the same images as before the option existed.
    default = SyntheticOptions(grid=4, max_objects=4, kinds=("shapes", "clock"), kind_weights=(1.0, 1.0))
    assert len({render_example(default, 2, "train", i)["metadata"]["background"] for i in range(40)}) == 5


def test_caption_names_the_kinds_in_reading_order():
    """The caption names the top-left-most object's kind first, and the transcript follows the
    caption's order of kinds."""
    options = SyntheticOptions(grid=4, max_objects=4, min_types=2, kinds=("shapes",), kind_weights=(1.0,))
    for i in range(30):
        example = render_example(options, 5, "train", i)
        caption = example["message_list"][0]["text"]
        first = example["metadata"]["objects"][0]  # objects are stored in reading order
        assert f"{first['colour']} {first['shape']}" in caption.split(". ")[1]  # plural too: a prefix
        kinds = [m.group(0) for m in KIND.finditer(caption.split(". ", 1)[1])]
        transcript_kinds = [m.group(0) for m in KIND.finditer(example["message_list"][1]["text"])]
        assert list(dict.fromkeys(transcript_kinds)) == list(dict.fromkeys(kinds))


@pytest.mark.parametrize("changes, message", [
    ({"backgrounds": ("light grey", "black")}, "backgrounds"),
    ({"image_size": (16, 112)}, "image_size"),
    ({"min_types": 4}, "min_types"),
    ({"min_objects": 4, "max_objects": 2}, "min_objects"),
    ({"kinds": ("shapes", "dogs"), "kind_weights": (1, 1)}, "kinds"),
    ({"kind_weights": (1.0,)}, "kind_weights"),
    ({"absent_label_rate": 1.5}, "absent_label_rate"),
    ({"clock_minute_step": 7}, "clock_minute_step"),
])
def test_bad_options_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        SyntheticOptions(**changes)
