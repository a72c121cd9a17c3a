"""`python -m tools.eval score` run as a subprocess on JSONL files written here."""
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_score(tmp_path, task, rows, *extra, raw=None):
    path = tmp_path / f"{task}.jsonl"
    raw = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    cmd = [sys.executable, "-m", "tools.eval", "score", "--task", task, "--predictions", str(path), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, path


def score_json(tmp_path, task, rows, *extra):
    proc, _ = run_score(tmp_path, task, rows, "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_vqa_json_and_table(tmp_path):
    rows = [{"prediction": "Two", "answers": ["2"] * 3 + ["3"] * 7},
            {"prediction": "Answer: the cat.", "answers": ["cat"] + ["dog"] * 9}]
    out = score_json(tmp_path, "vqa", rows)
    assert out["task"] == "vqa" and out["n"] == 2
    assert out["accuracy"] == pytest.approx((1 + 1 / 3) / 2)
    proc, _ = run_score(tmp_path, "vqa", rows)
    assert proc.returncode == 0
    assert "accuracy" in proc.stdout and "0.6667" in proc.stdout


def test_exact_gives_a_single_reference_full_credit(tmp_path):
    rows = [{"prediction": "Red.", "answers": ["red"]}, {"prediction": "2", "answers": ["3"]}]
    assert score_json(tmp_path, "exact", rows)["accuracy"] == pytest.approx(0.5)
    # VQA accuracy needs three agreeing references for full credit: 1/3 for the same right answer.
    assert score_json(tmp_path, "vqa", rows)["accuracy"] == pytest.approx(1 / 6)


def test_anls_relaxed_and_mc(tmp_path):
    out = score_json(tmp_path, "anls", [{"prediction": "helo", "answers": ["hello"]},
                                         {"prediction": "hello", "answers": ["hello"]}])
    assert out["anls"] == pytest.approx(0.9) and out["exact_match"] == 0.5
    out = score_json(tmp_path, "relaxed", [{"prediction": "10.4", "answers": ["10"]},
                                            {"prediction": "12", "answers": ["10"]}])
    assert out["accuracy"] == 0.5
    out = score_json(tmp_path, "mc", [{"prediction": "B", "answers": ["green"], "options": ["red", "green"]},
                                       {"prediction": "red", "answers": [1], "options": ["red", "green"]},
                                       {"prediction": "Paris", "answers": ["paris"]}])
    assert out["accuracy"] == pytest.approx(2 / 3) and out["n"] == 3


def test_counting_with_and_without_original_quirks(tmp_path):
    rows = [{"prediction": "There are none.", "count": 0},
            {"prediction": "Counting the <points x1=\"1.0\" y1=\"1.0\" x2=\"5.0\" y2=\"5.0\" alt=\"a\">a</points>"
                           " shows a total of 2.", "count": 3}]
    out = score_json(tmp_path, "counting", rows)
    assert (out["accuracy"], out["close"], out["valid"]) == (0.5, 1.0, 1.0)
    assert out["per_count"] == {"0": 1.0, "3": 0.0} and out["per_count_mean"] == 0.5
    quirks = score_json(tmp_path, "counting", rows, "--original-quirks")
    assert (quirks["accuracy"], quirks["valid"]) == (0.0, 0.5)


def test_pointing_with_masks_and_distance(tmp_path):
    rows = [
        {"prediction": '<points x1="22.0" y1="18.0" x2="75.0" y2="60.0" x3="50.0" y3="90.0" alt="o">o</points>',
         "points": [[20, 20], [70, 50]], "image_width": 100, "image_height": 80,
         "mask": [[10, 10, 20, 20], [60, 40, 20, 20]]},  # P 2/3, R 1
        {"prediction": '<point x="50.0" y="50.0" alt="o">o</point>',
         "points": [[52, 48]], "image_width": 100, "image_height": 100},  # within 5% of the diagonal
        {"prediction": "There are none.", "points": [], "image_width": 10, "image_height": 10},
    ]
    out = score_json(tmp_path, "pointing", rows)
    assert out["precision"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert out["recall"] == 1.0 and out["f1"] == pytest.approx((0.8 + 1 + 1) / 3) and out["n"] == 3
    strict = score_json(tmp_path, "pointing", rows, "--distance-threshold", "1")
    assert strict["recall"] == pytest.approx(2 / 3)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run([sys.executable, "-m", "tools.eval", "score", "--task", "vqa", "--predictions",
                           str(missing)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("task, raw, message", [
    ("vqa", '{"prediction": "a", "answers": ["a"]}\n{"prediction": "b", "answers": [\n', ":2: not valid JSON"),
    ("vqa", '{"prediction": "a", "answers": ["a"]}\n\n{"answers": ["a"]}\n', ":3: missing field 'prediction'"),
    ("counting", '{"prediction": "3", "count": "three"}\n', ":1: field 'count' must be an integer"),
    ("pointing", '{"prediction": "", "points": [[1, 2]], "image_width": 10}\n',
     ":1: missing field 'image_height'"),
    ("pointing", '{"prediction": "x", "points": [[1, 2]], "image_width": 10, "image_height": 10, '
                 '"mask": [[0, 0, 1, 1], [0, 0, 1, 1]]}\n', ":1: got 2 masks for 1"),
    ("mc", '[1, 2]\n', ":1: expected a JSON object"),
    ("vqa", b'{"prediction": "a", "answers": ["a"]}\n{"prediction": "caf\xe9", "answers": ["a"]}\n', ":2: not UTF-8"),
    ("anls", "", "no predictions"),
])
def test_bad_input_is_one_line_error_with_location(tmp_path, task, raw, message):
    proc, path = run_score(tmp_path, task, None, raw=raw)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_command_and_unknown_task(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.eval"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "choose a command" in proc.stderr
    proc, _ = run_score(tmp_path, "bogus", [{"prediction": "a"}])
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
