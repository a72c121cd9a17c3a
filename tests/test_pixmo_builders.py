"""PixMo / VQA builders: tiny parquet files in the Hub's schemas -> TFDS records -> examples in the contract."""
import collections
import contextlib
import hashlib
import io
import json
import pathlib
import re
import sys

import numpy as np
import pyarrow as pa
import pytest
import tensorflow_datasets as tfds

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures" / "pipeline"))
import hub_data  # noqa: E402

from input_pipeline import builders, conversions, datasets  # noqa: E402
from input_pipeline.builders import base, hub  # noqa: E402
from input_pipeline.builders.pixmo import dialogue_turns  # noqa: E402
from tools import build_data  # noqa: E402


def _build(args, capsys=None):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
        code = build_data.main(args)
    assert code == 0, err.getvalue()
    return out.getvalue().splitlines(), err.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every PixMo builder run once on the tiny Hub copy."""
    root = tmp_path_factory.mktemp("pixmo")
    info = hub_data.make_hub(root)
    data_dir = str(root / "data")
    common = ["--data-dir", data_dir, "--source", str(info["hub"])]
    images = ["--images", str(info["images"])]
    reports = {}
    for name, extra in [("pixmo_cap", ["--split-sizes", "validation=2"] + images),
                        ("pixmo_ask_model_anything", images), ("pixmo_cap_qa", images),
                        ("pixmo_points", ["--subset", "basic"] + images),
                        ("pixmo_points", ["--subset", "high_frequency"] + images),
                        ("pixmo_count", images), ("pixmo_point_explanations", images),
                        ("pixmo_docs", ["--subset", "charts"]),
                        ("pixmo_clocks", ["--images", str(info["clocks"])])]:
        key = name + ("/" + extra[1] if extra[0] == "--subset" else "")
        reports[key] = _build([name, *common, *extra])
    return info, data_dir, reports


def _examples(data_dir, name, split="train"):
    spec = datasets.spec(name)
    source = datasets.open_source(datasets.dataset_dir(data_dir, spec), split)
    out = []
    for i in range(len(source)):
        notes = collections.Counter()
        out.append((spec.convert(source[i], np.random.default_rng(i), notes), notes, source[i]))
    return out


def test_registry_lists_every_builder():
    assert builders.names() == sorted(["synthetic", "pixmo_cap", "pixmo_ask_model_anything", "pixmo_cap_qa",
                                       "pixmo_points", "pixmo_count", "pixmo_point_explanations", "pixmo_docs",
                                       "pixmo_clocks", "vqa"])


def test_reports_count_skipped_records_with_reasons(built):
    _, _, reports = built
    lines, _ = reports["pixmo_cap"]
    assert lines[1:] == ["train: 5 examples written, 3 records skipped", "  skipped 1: empty image file",
                         "  skipped 1: empty or missing caption", "  skipped 1: image not decodable",
                         "validation: 1 examples written, 1 records skipped", "  skipped 1: image not downloaded"]
    lines, err = reports["pixmo_ask_model_anything"]
    # One image's bytes do not match its image_sha256; it was the only validation image, so the
    # split is left out and the reason printed.
    assert lines[1:] == ["train: 2 examples written, 1 records skipped",
                         "  skipped 1: annotation with an empty question or answer"]
    assert "validation: not written, no usable record (skipped: 1 image sha256 mismatch)" in err
    lines, _ = reports["pixmo_clocks"]
    assert lines[1:] == ["train: 1 examples written, 1 records skipped",
                         "  skipped 1: no rendered image (PixMo-Clocks ships metadata only)"]


def test_records_keep_the_downloaded_bytes_and_hub_fields(built):
    info, data_dir, _ = built
    reader = tfds.builder_from_directory(str(datasets.dataset_dir(data_dir, datasets.spec("pixmo_cap"))))
    record = reader.as_data_source()["train"][0]
    url = record["image_url"].decode()
    assert record["image"] == (info["images"] / hub.url_filename(url)).read_bytes()
    assert record["image_sha256"].decode() == hashlib.sha256(record["image"]).hexdigest()
    annotations = json.loads(record["annotations"])
    assert set(annotations) == {"caption", "transcripts"} and annotations["caption"].startswith("A caption number")
    assert (int(record["width"]), int(record["height"])) == (40 + int(url.split("/")[-1][0]), 30)


def test_points_percent_styles_holdout_and_repairs(built):
    _, data_dir, _ = built
    meta = json.loads((datasets.dataset_dir(data_dir, datasets.spec("pixmo_points")) / "metadata.json").read_text())
    assert meta["point_scale"].startswith("percent") and meta["eval_holdout"] == {
        "applied": True, "eval_images": 1, "removed_images": 1}
    urls = set()
    for split in ("train", "validation"):
        for example, notes, record in _examples(data_dir, "pixmo_points", split):
            urls.add(example["metadata"]["image_url"])
            convs = example["message_list"]
            assert {c["style"] for c in convs} == {"pointing"} and all(c["point_scale"] == 100.0 for c in convs)
            if example["metadata"]["image_url"].endswith("p1.jpg"):  # (104, -3) clamped into the image
                np.testing.assert_allclose(convs[0]["points"], [[100.0, 0.0]])
                assert notes == {"points clamped into the image": 1}
    assert urls == {f"http://img.test/points/p{i}.jpg" for i in (1, 2, 3)}  # p0 held out, p4/p5 are counting
    (example, notes, _), = [e for e in _examples(data_dir, "pixmo_points_high_freq_counting", "train")
                            + _examples(data_dir, "pixmo_points_high_freq_counting", "validation")
                            if e[0]["metadata"]["image_url"].endswith("p4.jpg")]
    # p4's "Red Dot" has a NaN coordinate: that conversation is dropped, the "cat" one stays.
    assert [c["label"] for c in example["message_list"]] == ["cat"] and example["message_list"][0]["style"] == "point_count"
    assert notes == {"conversation dropped: NaN or missing coordinates": 1}


def test_count_pixels_and_odd_image_modes(built):
    _, data_dir, _ = built
    examples = _examples(data_dir, "pixmo_count_counting", "train")
    assert len(examples) == 3
    for example, _, record in examples:
        (conv,) = example["message_list"]
        assert conv["style"] == "point_count" and conv["point_scale"] == 0 and example["metadata"]["count"] == 2
        assert np.all(conv["points"] <= [record["width"], record["height"]])
    evaluation = _examples(data_dir, "pixmo_count", "test")
    assert [len(e[0]["message_list"][0]["points"]) for e in evaluation] == [0, 0]


def test_qa_datasets_how_many_rule_and_dialogues(built):
    _, data_dir, _ = built
    for example, _, _ in _examples(data_dir, "pixmo_ask_model_anything"):
        first, second = example["message_list"]
        assert first["question"].endswith("How many dots are in picture " + example["metadata"]["image_url"][-5] + "?")
        assert first["question"][: -len("How many dots are in picture 0?")] in conversions.NO_POINTING_PREFIXES
        assert second["question"].startswith("What is picture")  # not a "how many" question: unchanged
    (example, _, _), = _examples(data_dir, "pixmo_cap_qa", "train")
    turns = [c["messages"] for c in example["message_list"]]
    assert turns[1] == ["Is it bright?", "Somewhat."]  # parsed from the [USER]/[ASSISTANT] string
    assert turns[0][0] == "What is this?" and turns[0][2].endswith("How many colours?") and turns[0][2] != "How many colours?"
    assert dialogue_turns("[USER] a [ASSISTANT] b [USER] c [ASSISTANT]", "d") == ["a", "b", "c", "d"]
    with pytest.raises(hub.SkipRecord):
        dialogue_turns("[ASSISTANT] a [USER]", "d")


def test_point_explanations_split_and_filled(built):
    _, data_dir, _ = built
    by_part = {}
    for split in ("train", "validation"):
        for example, _, record in _examples(data_dir, "pixmo_pointing_explanations", split):
            by_part.setdefault(example["metadata"]["image_url"], []).append(len(example["message_list"]))
            assert all(c["style"] == "point_qa" for c in example["message_list"])
            assert example["message_list"][0]["answer"] == (
                'The <point x="45.1" y="20.3" alt="lamp">lamp</point> is upside down, unlike the <points x1="10.0" '
                'y1="80.0" x2="30.5" y2="81.2" alt="chairs">chairs</points>.')
    # 3 questions -> records of 2 and 1; 1 question (+1 without a response) -> 1 record.
    assert sorted(by_part["http://img.test/expl/0.jpg"]) == [1, 2] and by_part["http://img.test/expl/1.jpg"] == [1]


def test_docs_and_clocks(built):
    _, data_dir, _ = built
    docs = _examples(data_dir, "pixmo_docs_charts", "train")
    assert len(docs) == 3 and all(e[0]["metadata"]["image_url"] == "" for e in docs)
    assert {c["style"] for e in docs for c in e[0]["message_list"]} == {"pixmo_docs_charts"}
    assert len(_examples(data_dir, "pixmo_docs_charts", "validation")) == 1
    (clock, _, _), = _examples(data_dir, "pixmo_clocks")
    assert clock["message_list"] == [{"style": "clocks", "question": "What time is being shown?", "answer": "9:05"}]
    assert conversions.clock_answer({"hour": 3, "minute": 7}) == "3:07"


def test_builds_are_deterministic(tmp_path):
    info = hub_data.make_hub(tmp_path / "src")
    files = []
    for name in ("one", "two"):
        _build(["pixmo_points", "--subset", "basic", "--data-dir", str(tmp_path / name), "--source", str(info["hub"]),
                "--images", str(info["images"])])
        folder = tmp_path / name / "pixmo_points" / "basic" / "1.0.0"
        files.append({p.name: p.read_bytes() for p in folder.glob("*.array_record-*")})
    assert files[0] and files[0] == files[1]


def test_validation_split_follows_the_url_hash_and_survives_dead_urls(tmp_path):
    urls = [f"http://img.test/v/{i}.jpg" for i in range(40)]
    chosen = hub.validation_keys(urls, 5)
    assert len(chosen) == 5 and chosen == hub.validation_keys(list(reversed(urls)), 5)
    assert chosen <= set(urls) and hub.validation_keys(urls, 6) > chosen


def test_source_errors_are_clear(tmp_path, capsys):
    hub_dir = tmp_path / "hub"
    hub_data.write(hub_dir / "pixmo-cap" / "data" / "train-00000-of-00001.parquet", [{"image_url": "u", "text": "x"}],
                   pa.schema([("image_url", pa.string()), ("text", pa.string())]))
    cases = [(["pixmo_cap", "--data-dir", str(tmp_path / "d")], "--source is required"),
             (["pixmo_cap", "--data-dir", str(tmp_path / "d"), "--source", str(hub_dir)], "--images is required"),
             (["pixmo_cap", "--data-dir", str(tmp_path / "d"), "--source", str(hub_dir), "--images", str(tmp_path)],
              "train-00000-of-00001.parquet: missing column(s) ['caption', 'transcripts']"),
             (["pixmo_count", "--data-dir", str(tmp_path / "d"), "--source", str(hub_dir), "--images", str(tmp_path)],
              "no train-*.parquet files of allenai/pixmo-count")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            build_data.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_image_checks_classify_the_bad_corpus():
    bad = hub_data.bad_images()
    expected = {"corrupt": "image not decodable", "empty": "empty image file", "huge": "image too large",
                "failure_note": "image not decodable"}
    for name, reason in expected.items():
        with pytest.raises(hub.SkipRecord, match=reason):
            hub.inspect_image(bad[name])
    assert hub.inspect_image(bad["cmyk"]) == (32, 24) and hub.inspect_image(bad["sixteen_bit"]) == (24, 20)
    assert hub.inspect_image(bad["truncated"]) == (64, 48)  # header intact: the loader finds the rest
    with pytest.raises(hub.SkipRecord, match="sha256 mismatch"):
        hub.inspect_image(hub_data.image_bytes(), expected_sha256="0" * 64)
    assert hub.point_pairs({"x": [1.0, float("nan")], "y": [2.0, 3.0]}) == [[1.0, 2.0], [None, 3.0]]


def test_vqa_builder_jsonl_packs_questions_per_image(tmp_path):
    source, images = tmp_path / "src", tmp_path / "img"
    source.mkdir()
    images.mkdir()
    (images / "a.png").write_bytes(hub_data.image_bytes(20, 20, fmt="PNG"))
    (images / "b.png").write_bytes(hub_data.image_bytes(22, 20, seed=3, fmt="PNG"))
    rows = [{"image": "a.png", "question": "What?", "answers": ["x", "x", "y"]},
            {"image": "a.png", "question": "Which?", "options": ["cat", "dog"], "answer": 1},
            {"image": "b.png", "question": "Weighted?", "answer": "yes", "weight": 1.5},
            {"image": "b.png", "question": "", "answer": "dropped"},
            {"image": "missing.png", "question": "Lost?", "answer": "no"}]
    (source / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    lines, _ = _build(["vqa", "--name", "my_vqa", "--style", "vqa2", "--data-dir", str(tmp_path / "d"),
                       "--source", str(source), "--images", str(images)])
    assert lines[1:] == ["train: 2 examples written, 2 records skipped", "  skipped 1: image file not found",
                         "  skipped 1: question missing or empty"]
    examples = {len(e[0]["message_list"]): e for e in _examples(str(tmp_path / "d"), "vqa:my_vqa")}
    packed, single = examples[2][0], examples[1][0]
    assert packed["message_list"] == [{"style": "vqa2", "question": "What?", "answers": ["x", "x", "y"]},
                                      {"style": "vqa2", "question": "Which?", "options": ["cat", "dog"], "answer": 1}]
    assert single["weight"] == 1.5 and single["message_list"][0]["answer"] == "yes"
    assert base.split_report(tfds.builder_from_directory(str(datasets.dataset_dir(
        str(tmp_path / "d"), datasets.spec("vqa:my_vqa")))))["train"]["written"] == 2


@pytest.mark.parametrize("content, message", [
    (b'{"image": "a.png", "question": "Q?", "answer": "x"}\n{not json\n', r"train.jsonl:2: not valid JSON"),
    (b'{"image": "a.png", "question": "Q?", "answer": "x"}\n{"question": "caf\xe9"}\n', r"train.jsonl:2: not UTF-8"),
    (b'["a list"]\n', r"train.jsonl:1: expected a JSON object, got list"),
])
def test_vqa_builder_malformed_source_lines_exit_2_before_writing(tmp_path, capsys, content, message):
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.jsonl").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        build_data.main(["vqa", "--name", "my_vqa", "--data-dir", str(tmp_path / "d"), "--source", str(source)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not (tmp_path / "d").exists()
