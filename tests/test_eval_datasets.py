"""`tools.eval --checkpoint` on datasets built by `tools.build_data` (VQA-style academic sets, PixMo), on
one device and on a sharded mesh, and its errors for datasets it cannot evaluate."""
import collections
import contextlib
import io
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures" / "pipeline"))
import hub_data  # noqa: E402

from input_pipeline import datasets, evaluation  # noqa: E402
from molmo_jax.preprocess import formatting  # noqa: E402
from tools import build_data  # noqa: E402
from tools import eval as eval_cli  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# name: (build style, split file, rows). One VQA-accuracy set, one multiple-choice, one ANLS.
ROWS = {
    "text_vqa": ("text_vqa", "validation", [
        {"image": "0.png", "question": "What color is it?", "answers": ["red", "red", "red", "blue"]},
        {"image": "0.png", "question": "How many dots?", "answers": ["2", "two", "3"]},
        {"image": "1.png", "question": "What is written?", "answers": ["stop"]}]),
    "a_okvqa_mc": ("a_okvqa_mc", "validation", [
        {"image": "1.png", "question": "Which animal?", "options": ["cat", "dog", "bird"], "answer": 1},
        {"image": "2.png", "question": "Which season?", "options": ["winter", "summer"], "answer": "summer"}]),
    "doc_qa": ("doc_qa", "test", [
        {"image": "2.png", "question": "What is the title?", "answers": ["Annual report", "annual report 2020"]},
        {"image": "0.png", "question": "Who signed?", "answer": "J. Smith"}]),
}
# Hand-made predictions, row by row, and what `tools.eval score` must make of them.
KNOWN = {
    "text_vqa": (["Red", "two", "go"], "vqa", {"accuracy": (1 + 2 / 3 + 0) / 3}),
    "a_okvqa_mc": (["B", "winter"], "mc", {"accuracy": 0.5}),
    "doc_qa": (["annual reprt", "J. Smith"], "anls", {"anls": (1 - 1 / 13 + 1) / 2, "exact_match": 0.5}),
}


def _quiet(fn, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(*args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The three sets built with the real vqa builder, and a tiny model saved with save_model."""
    from molmo_jax import config, weights
    from molmo_jax import models as model_lib

    root = tmp_path_factory.mktemp("eval_datasets")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(hub_data.image_bytes(40 + 8 * i, 30, seed=i, fmt="PNG"))
    for name, (style, split, rows) in ROWS.items():
        source = root / "src" / name
        source.mkdir(parents=True)
        (source / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        code, _, err = _quiet(build_data.main, ["vqa", "--name", name, "--style", style, "--data-dir",
                                                str(root / "data"), "--source", str(source), "--images", str(images)])
        assert code == 0, err
    model = model_lib.create_model(config.tiny(), seed=3)
    # Well separated logits: greedy tokens do not hinge on float noise (the mesh test compares them).
    model.llm.ff_out.kernel.value = model.llm.ff_out.kernel.value * 10.0
    weights.save_model(root / "model", model.cfg, model)
    return root


def _evaluate(setup, dataset, out, *extra):
    argv = ["--checkpoint", str(setup / "model"), "--dataset", dataset, "--data-dir", str(setup / "data"),
            "--out", str(out), *extra]
    code, stdout, stderr = _quiet(eval_cli.main, argv)
    assert code == 0, stderr
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "metrics.json").read_text()), stdout


def _score(tmp_path, task, rows):
    path = tmp_path / f"{task}_{len(rows)}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, stderr = _quiet(eval_cli.main, ["score", "--task", task, "--predictions", str(path), "--json"])
    assert code == 0, stderr
    return json.loads(stdout)


@pytest.fixture(scope="module")
def one_device(setup):
    return {name: _evaluate(setup, f"{name}:{split}", setup / f"out_{name}")
            for name, (_, split, _) in ROWS.items()}


def test_predictions_have_one_row_per_question_with_its_ground_truth(one_device):
    for name, (_, _, source_rows) in ROWS.items():
        rows, metrics, stdout = one_device[name]
        task = KNOWN[name][1]
        assert len(rows) == len(source_rows) and all(r["task"] == task and r["dataset"] == name for r in rows)
        by_question = {r["question"]: r for r in rows}
        for src in source_rows:
            row = by_question[src["question"]]
            assert isinstance(row["prediction"], str)
            if "options" in src:  # mc: the index of the correct option, and the options
                want = src["answer"] if isinstance(src["answer"], int) else src["options"].index(src["answer"])
                assert row["answers"] == [want] and row["options"] == src["options"]
            else:
                assert row["answers"] == src.get("answers", [src.get("answer")])
        expected_keys = {"vqa": {"accuracy", "n"}, "mc": {"accuracy", "n"}, "anls": {"anls", "exact_match", "n"}}
        assert set(metrics) == {task} and set(metrics[task]) == expected_keys[task]
        assert metrics[task]["n"] == len(source_rows) and f"task {task}" in stdout


def test_score_command_agrees_and_scores_known_answers(one_device, tmp_path):
    for name, (predictions, task, expected) in KNOWN.items():
        rows, metrics, _ = one_device[name]
        # The file the generation wrote re-scores to the same numbers ...
        assert _score(tmp_path, task, rows) == dict(task=task, **metrics[task])
        # ... and the same rows with hand-made predictions score as worked out by hand.
        by_question = {r["question"]: r for r in rows}
        made = [dict(by_question[src["question"]], prediction=p) for src, p in zip(ROWS[name][2], predictions)]
        out = _score(tmp_path, task, made)
        for key, value in expected.items():
            assert out[key] == pytest.approx(value), (name, key)


def test_multiple_choice_prompt_lists_options_as_training_does(setup):
    examples = list(evaluation.make_eval_examples("a_okvqa_mc", "validation", str(setup / "data")))
    assert [e["metadata"]["answers"] for e in examples] == [[1], [1]]
    for ex, src in zip(examples, ROWS["a_okvqa_mc"][2]):
        (conv,) = ex["message_list"]
        rng = lambda: np.random.default_rng(ex["metadata"]["seed"])  # noqa: E731
        prompt = formatting.format_conversation(conv, rng(), for_inference=True)
        trained = formatting.format_conversation(dict(conv, answer=src["answer"]), rng())
        assert prompt == trained[:1]
        listed = "\n".join(f"{chr(65 + i)}: {o}" for i, o in enumerate(src["options"]))
        assert prompt[0] == f" User: a_okvqa_mc: {src['question']}\n{listed}\n Assistant:"


def test_sharded_mesh_gives_the_same_predictions_and_metrics(setup, one_device):
    """Greedy decoding of the same f32 weights: only the order of float sums differs between the runs
    (partial sums over fsdp/tensor shards), far below the gaps between the top logits of this model."""
    from molmo_jax import sharding, weights

    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=2,tensor=2"))
    _, model = weights.load(setup / "model", mesh=mesh)  # what --mesh loads: really split
    assert model.llm.blocks.attn.wq.kernel[...].sharding.spec[1:] == ("fsdp", "tensor", None)
    rows, metrics, _ = _evaluate(setup, "text_vqa:validation", setup / "mesh", "--mesh", "data=2,fsdp=2,tensor=2")
    want_rows, want_metrics, _ = one_device["text_vqa"]
    assert rows == want_rows and metrics == want_metrics


@pytest.fixture(scope="module")
def pixmo(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_pixmo")
    info = hub_data.make_hub(root)
    data_dir = str(root / "data")
    common = ["--data-dir", data_dir, "--source", str(info["hub"])]
    for name, extra in [("pixmo_points", ["--subset", "basic", "--images", str(info["images"])]),
                        ("pixmo_count", ["--images", str(info["images"])]),
                        ("pixmo_docs", ["--subset", "charts"]), ("pixmo_clocks", ["--images", str(info["clocks"])])]:
        code, _, err = _quiet(build_data.main, [name, *common, *extra])
        assert code == 0, err
    return data_dir


def _examples(data_dir, name, split=None):
    skipped = collections.Counter()
    return list(evaluation.make_eval_examples(name, split, data_dir, skipped=skipped)), skipped


def test_pixmo_points_count_docs_and_clocks_ground_truth(pixmo):
    pointing, _ = _examples(pixmo, "pixmo_points")  # no test split: validation
    counting, _ = _examples(pixmo, "pixmo_points_counting")
    assert pointing and len(pointing) == len(counting)
    for p, c in zip(pointing, counting):
        width, height = p["metadata"]["image_width"], p["metadata"]["image_height"]
        assert p["metadata"]["example_id"].startswith("validation/") and (width, height) == (50, 40)
        assert p["message_list"][0] == {"style": "pointing", "label": p["metadata"]["label"]}
        assert c["message_list"][0]["style"] == "point_count" and c["metadata"]["task"] == "counting"
        assert c["metadata"]["count"] == len(p["metadata"]["points"])
        for x, y in p["metadata"]["points"]:  # percent in the data, pixels in the ground truth
            assert 0 <= x <= width and 0 <= y <= height
    assert [60.5 * 50 / 100, 70.25 * 40 / 100] in [pt for p in pointing for pt in p["metadata"]["points"]]

    counts, _ = _examples(pixmo, "pixmo_count_counting", "test")
    assert [e["metadata"]["count"] for e in counts] == [2, 2]
    assert counts[0]["message_list"][0] == {"style": "point_count", "label": "boats"}
    none, skipped = _examples(pixmo, "pixmo_count", "test")  # points exist for train only
    assert none == [] and skipped == {"no points, only a count (evaluate the counting variant)": 2}
    train, _ = _examples(pixmo, "pixmo_count", "train")  # pixel points stay pixels
    assert [[12.0, 8.0], [60.0, 10.0]] in [e["metadata"]["points"] for e in train]  # 70 clamped to the width

    docs, _ = _examples(pixmo, "pixmo_docs_charts")
    assert [(e["metadata"]["task"], e["metadata"]["answers"]) for e in docs] == [("relaxed", ["Chart 0"]),
                                                                                 ("relaxed", ["blue"])]
    assert docs[0]["message_list"][0] == {"style": "pixmo_docs_charts", "question": "What is the title?"}
    clocks, _ = _examples(pixmo, "pixmo_clocks", "train")
    assert [tuple(e["metadata"][k] for k in ("task", "answers", "hour", "minute")) for e in clocks] == \
        [("clock", ["9:05"], 9, 5)]


@pytest.mark.parametrize("dataset, message", [
    ("nope", "unknown evaluation task 'nope'; known: synthetic_pointing"),
    ("okvqa", "dataset 'okvqa' is not built under"),
    ("text_vqa:train", "no split 'train' (it has ['validation'])"),
    ("pixmo_cap", "dataset 'pixmo_cap' has no evaluation metric"),
])
def test_bad_datasets_exit_2_naming_the_problem(setup, dataset, message):
    code, _, stderr = _quiet(eval_cli.main, ["--checkpoint", str(setup / "model"), "--dataset", dataset,
                                             "--data-dir", str(setup / "data"), "--out", str(setup / "bad")])
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    if dataset == "okvqa":  # says how to build it
        assert "python -m tools.build_data vqa --data-dir" in stderr and "--name okvqa --style okvqa" in stderr


def test_bad_input_from_the_command_line(setup):
    """A real process: exit status 2, one line, no traceback (bad mesh; unbuilt dataset)."""
    for extra, message in ((["--dataset", "text_vqa:validation", "--mesh", "data=3"], "--mesh data=3:"),
                           (["--dataset", "chart_qa"], "dataset 'chart_qa' is not built")):
        proc = subprocess.run([sys.executable, "-m", "tools.eval", "--checkpoint", str(setup / "model"),
                               "--data-dir", str(setup / "data"), "--out", str(setup / "bad"), *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert datasets.spec("chart_qa_weighted").builder == "vqa"
