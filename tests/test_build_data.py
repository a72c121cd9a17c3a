"""`python -m tools.build_data`, the builder registry and the synthetic TFDS builder (ArrayRecord)."""
import contextlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline import builders, synthetic
from input_pipeline.builders import base
from input_pipeline.builders.synthetic import SyntheticPixmo, load_example, make_config
from tools import build_data

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--split-sizes", "train=12,validation=4,test=0", "--image-size", "96"]


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.build_data", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _dataset_dir(data_dir: pathlib.Path) -> pathlib.Path:
    (info,) = data_dir.glob("synthetic_pixmo/*/1.0.0/dataset_info.json")
    return info.parent


@pytest.fixture(scope="module")
def built_twice(tmp_path_factory):
    """The same tiny dataset built by two separate processes (map-order randomness differs per process)."""
    dirs = [tmp_path_factory.mktemp(name) for name in ("first", "second")]
    runs = [_run_cli("synthetic", "--data-dir", str(d), *TINY) for d in dirs]
    for run in runs:
        assert run.returncode == 0, run.stderr
    return dirs, runs


def test_cli_reports_written_and_skipped_per_split(built_twice):
    (first, _), (run, _) = built_twice
    lines = run.stdout.splitlines()
    assert lines[0] == f"synthetic: built dataset at {_dataset_dir(first)}"
    assert lines[1:] == ["train: 12 examples written, 0 records skipped",
                         "validation: 4 examples written, 0 records skipped"]


def test_builds_are_byte_identical(built_twice):
    (first, second), _ = built_twice
    files = sorted(p.name for p in _dataset_dir(first).iterdir())
    assert sum(".array_record-" in name for name in files) == 2
    assert files == sorted(p.name for p in _dataset_dir(second).iterdir())
    for name in files:
        if name.endswith(".json"):
            continue  # dataset_info.json records paths/sizes; the data files are what must match
        assert (_dataset_dir(first) / name).read_bytes() == (_dataset_dir(second) / name).read_bytes(), name


def test_output_reads_back_as_the_rendered_examples(built_twice):
    (first, _), _ = built_twice
    reader = tfds.builder_from_directory(str(_dataset_dir(first)))
    assert base.split_report(reader) == {"train": {"written": 12, "skipped": {}},
                                         "validation": {"written": 4, "skipped": {}}}
    options = synthetic.SyntheticOptions(image_size=(96, 96))
    for decoders in (None, {"image": tfds.decode.SkipDecoding()}):  # decoded array or PNG bytes
        source = reader.as_data_source(decoders=decoders)["validation"]
        by_index = {}
        for i in range(len(source)):
            record = source[i]
            example = load_example(record)
            by_index[example["metadata"]["index"]] = (record, example)
        assert sorted(by_index) == [0, 1, 2, 3]
        for index, (record, example) in by_index.items():
            expected = synthetic.render_example(options, 0, "validation", index)
            np.testing.assert_array_equal(example["image"], expected["image"])
            assert (record["width"], record["height"]) == (96, 96)
            assert example["metadata"] == json.loads(json.dumps(expected["metadata"]))
            assert [c["style"] for c in example["message_list"]] == [c["style"] for c in expected["message_list"]]
            for got, want in zip(example["message_list"], expected["message_list"]):
                if "points" in want:
                    assert got["points"].dtype == np.float32 and got["points"].shape == want["points"].shape
                    np.testing.assert_allclose(got["points"], want["points"], atol=0.01)
                    assert {k: v for k, v in got.items() if k != "points"} == \
                        {k: v for k, v in want.items() if k != "points"}
                else:
                    assert got == want


def test_rebuild_reuses_the_dataset(built_twice, capsys):
    (first, _), _ = built_twice
    assert build_data.main(["synthetic", "--data-dir", str(first), *TINY]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("synthetic: reused the existing dataset at")
    assert out[1] == "train: 12 examples written, 0 records skipped"
    train_file = next(_dataset_dir(first).glob("*-train.array_record-*"))
    before = train_file.read_bytes()
    assert build_data.main(["synthetic", "--data-dir", str(first), *TINY, "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith("synthetic: built dataset at")
    assert train_file.read_bytes() == before


@pytest.mark.parametrize("argv, message", [
    (["imagenet", "--data-dir", "x"], "unknown dataset 'imagenet'; choose one of: "),
    (["synthetic"], "--data-dir"),
    (["synthetic", "--data-dir", "x", "--split-sizes", "train=ten"], "expected SPLIT=N"),
    (["synthetic", "--data-dir", "x", "--split-sizes", "dev=3"], "unknown split 'dev'"),
    (["synthetic", "--data-dir", "x", "--split-sizes", "train=0,validation=0,test=0"], "nothing to build"),
    (["synthetic", "--data-dir", "x", "--source", "hub/"], "--source and --images do not apply"),
    (["synthetic", "--data-dir", "x", "--image-size", "big"], "--image-size"),
    (["synthetic", "--data-dir", "x", "--image-size", "8"], "image_size"),
    (["synthetic", "--data-dir", "x", "--kinds", "shapes=1,dogs=2"], "kinds"),
    (["synthetic", "--data-dir", "x", "--max-objects", "0"], "max_objects"),
    ([], "the first argument must be the dataset NAME, one of: "),
    (["--data-dir", "x", "synthetic"], "the first argument must be the dataset NAME"),
])
def test_bad_arguments_exit_with_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, even relative to the working directory
    with pytest.raises(SystemExit) as exit_info:
        build_data.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_unknown_name_from_the_command_line():
    run = _run_cli("pixmo_nope", "--data-dir", "/nonexistent")
    assert run.returncode == 2 and "unknown dataset 'pixmo_nope'" in run.stderr and not run.stdout


def test_registry_and_configs():
    assert "synthetic" in builders.names()
    assert builders.get_builder_class("synthetic") is SyntheticPixmo
    with pytest.raises(KeyError, match="unknown dataset 'x'"):
        builders.get_builder_class("x")
    assert make_config().name == "default"
    small, other = make_config(split_sizes={"train": 5}), make_config(split_sizes={"train": 5}, seed=1)
    assert small.name.startswith("custom_") and small.name == make_config(split_sizes={"train": 5}).name
    assert other.name != small.name and dict(small.split_sizes) == {"train": 5, "validation": 200, "test": 200}


def test_load_example_errors_name_the_problem():
    record = {"image": np.zeros((4, 4, 3), np.uint8), "message_list": b"[]", "metadata": b"{}"}
    assert load_example(record)["message_list"] == []
    with pytest.raises(KeyError, match=r"lacks field\(s\) \['metadata'\]"):
        load_example({k: v for k, v in record.items() if k != "metadata"})
    with pytest.raises(ValueError, match="`message_list` is not valid JSON"):
        load_example({**record, "message_list": b"[{"})
    with pytest.raises(ValueError, match="not a decodable image"):
        load_example({**record, "image": b"\x89PNG truncated"})
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        load_example({**record, "image": np.zeros((4, 4), np.uint8)})


class SkippingToyBuilder(base.RecordBuilder):
    """A builder that drops some records, as PixMo builders drop dead images."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self._make_info(tfds.features.FeaturesDict({"value": np.int32}), description="toy")

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", 10), "validation": self._generate_examples("validation", 4)}

    def _generate_examples(self, split, n):
        skips = base.SkipCounter(split)
        for i in range(n):
            if i % 3 == 1:
                skips.skip("missing image")
            elif i % 5 == 4:
                skips.skip("corrupt image")
            else:
                yield i, {"value": i}
        self._record_skips(skips)


def test_skip_counts_are_stored_with_the_dataset_and_reported(tmp_path):
    builder = SkippingToyBuilder(data_dir=str(tmp_path))
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress lines
        builder.download_and_prepare(file_format="array_record", download_dir=str(tmp_path / "scratch"))
    expected = {"train": {"written": 6, "skipped": {"corrupt image": 1, "missing image": 3}},
                "validation": {"written": 3, "skipped": {"missing image": 1}}}
    assert base.split_report(builder) == expected
    reader = tfds.builder_from_directory(builder.data_dir)
    assert base.split_report(reader) == expected
    assert build_data.format_report(expected) == [
        "train: 6 examples written, 4 records skipped", "  skipped 1: corrupt image", "  skipped 3: missing image",
        "validation: 3 examples written, 1 records skipped", "  skipped 1: missing image"]
