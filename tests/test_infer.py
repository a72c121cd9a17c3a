"""The answering API (molmo_jax.inference) and the `tools.infer` command line, on the golden models."""
import functools
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import GOLDEN
from molmo_jax import weights as ckpt_lib
from molmo_jax import generate as gen_lib
from molmo_jax import inference
from tools import infer

QWEN = GOLDEN / "models" / "qwen2_style"
TOKENIZER = GOLDEN / "tiny-qwen2-style-tokenizer"
IMAGE, IMAGE2 = QWEN / "image_330x420.png", QWEN / "image2_60x100.png"


@functools.lru_cache(maxsize=None)
def answerer():
    return inference.Answerer.load(QWEN, TOKENIZER)


def expected(name="qwen2_style"):
    return dict(np.load(GOLDEN / "models" / name / "expected.npz"))


def test_ask_reproduces_the_golden_decode():
    """Image file + prompt -> the reference's 16 greedy tokens (preprocessing included)."""
    exp = expected()
    a = answerer().ask(str(IMAGE), "Describe this image.", max_new_tokens=16)
    np.testing.assert_array_equal(a.tokens, exp["greedy_tokens"])
    np.testing.assert_allclose(a.score, exp["greedy_score"], atol=1e-3, rtol=0)
    assert a.text == answerer().tokenizer.decode(exp["greedy_tokens"]).strip()
    assert a.image_size == (420, 330) and a.finish == "length" and a.points_px.shape == (0, 2)


def test_ask_many_batches_prompts_of_different_lengths_and_crops():
    """The golden 2-example batch (tilings 2x3 and 1x1, prompts of different lengths), asked
    together: each row decodes as the reference's inputs do."""
    exp = expected()
    answers = answerer().ask_many([(str(IMAGE), "Describe this image."),
                                   {"image": str(IMAGE2), "prompt": "What color is the circle?"}],
                                  max_new_tokens=8)
    np.testing.assert_array_equal(answers[0].tokens, exp["greedy_tokens"][:8])
    inp = np.load(QWEN / "inputs.npz")
    golden_batch = {k: inp["batch2_" + k] for k in gen_lib.MODEL_INPUTS}
    row1 = answerer().generator(golden_batch, gen_lib.Sampling(max_new_tokens=8))["tokens"][1]
    np.testing.assert_array_equal(answers[1].tokens, row1[row1 >= 0])
    assert answers[1].image_size == (100, 60) and answers[1].prompt == "What color is the circle?"


def test_make_answer_parses_points_and_counts():
    text = ' Counting the <points x1="10.0" y1="20.0" x2="50.0" y2="50.0" alt="mug">mug</points> shows a total of 2.'
    a = inference.make_answer(text + " User: more", [5, 6], "stop", -1.5, image_size=(200, 100),
                              stop_strings=(" User:",))
    assert a.text == text.strip()
    np.testing.assert_allclose(a.points_px, [[20.0, 20.0], [100.0, 50.0]])
    assert a.count == 2 and not a.valid_point_format
    one = inference.make_answer('<point x="25.0" y="75.0" alt="cat">cat</point>', [1], "eos", 0.0, (40, 40))
    np.testing.assert_allclose(one.points_px, [[10.0, 30.0]])
    assert one.valid_point_format and one.count == 1
    assert json.loads(json.dumps(one.to_json()))["points_px"] == [[10.0, 30.0]]
    assert inference.make_answer("There are none.", [], "eos", 0.0, (40, 40)).count == 0
    assert inference.make_answer("blue", [], "eos", 0.0, None).points_px.shape == (0, 2)


def test_no_tokenizer_is_a_clear_error():
    with pytest.raises(inference.NoTokenizerError, match="pass one with --tokenizer"):
        inference.find_tokenizer(QWEN)
    with pytest.raises(SystemExit, match="no tokenizer found"):
        infer.main(["--checkpoint", str(QWEN), "--image", str(IMAGE), "--prompt", "Hi"])


# ------------------------------------------------------------------------------------------------
# Command line

@pytest.mark.parametrize("name", ["olmo_style", "qwen2_style"])
def test_cli_inputs_mode_reproduces_golden(name, tmp_path, capsys):
    model = GOLDEN / "models" / name
    out = tmp_path / "out.npz"
    cmd = ["--checkpoint", str(model), "--inputs", str(model / "inputs.npz"), "--max-new-tokens", "16",
           "--out", str(out)]
    if name == "olmo_style":  # once through a real `python -m` process
        proc = subprocess.run([sys.executable, "-m", "tools.infer", *cmd], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:  # no tokenizer: the config's EOS id is outside this tiny vocabulary, and it is said so
        infer.main(cmd)
        assert "EOS 151643 from the config, outside the vocabulary of 512: no end of text" in capsys.readouterr().out
        infer.main(cmd + ["--tokenizer", str(TOKENIZER)])
        assert "EOS 384 from the tokenizer" in capsys.readouterr().out
    got, exp = np.load(out), expected(name)
    np.testing.assert_array_equal(got["greedy_tokens"], exp["greedy_tokens"])
    np.testing.assert_allclose(got["greedy_step_logits"], exp["greedy_step_logits"], atol=1e-4, rtol=0)


def test_cli_single_image_from_a_molmo_jax_checkpoint(tmp_path, capsys):
    """A molmo_jax model directory carrying its tokenizer: no --tokenizer needed; --json output and
    the image with points drawn."""
    cfg, model = ckpt_lib.load(QWEN)
    ckpt = ckpt_lib.save_model(tmp_path / "model", cfg, model, tokenizer_dir=TOKENIZER)
    drawn = tmp_path / "points.png"
    infer.main(["--checkpoint", str(ckpt), "--image", str(IMAGE), "--prompt", "Describe this image.",
                "--max-new-tokens", "16", "--json", "--out-image", str(drawn)])
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["tokens"] == expected()["greedy_tokens"].tolist()
    assert answer["image_size"] == [420, 330] and answer["finish"] == "length"
    assert Image.open(drawn).size == (420, 330)


def test_cli_batch_mode(tmp_path, capsys):
    for src in (IMAGE, IMAGE2):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    requests = tmp_path / "requests.jsonl"
    records = [{"image": IMAGE.name, "prompt": "Describe this image."},  # relative to the JSONL file
               {"image": str(tmp_path / IMAGE2.name), "prompt": "What color is the circle?"}]
    requests.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")  # blank lines are skipped
    out = tmp_path / "answers.jsonl"
    infer.main(["--checkpoint", str(QWEN), "--tokenizer", str(TOKENIZER), "--batch", str(requests),
                "--out", str(out), "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 2 and answers[1]["prompt"] == "What color is the circle?"
    assert answers[0]["tokens"] == expected()["greedy_tokens"][:8].tolist()
    assert "tokens/s" in captured.out and "2/2" in captured.err  # the summary and the progress bar


def test_cli_bad_inputs_give_one_line_errors(tmp_path, capsys):
    base = ["--checkpoint", str(QWEN), "--tokenizer", str(TOKENIZER)]
    with pytest.raises(SystemExit, match="nowhere.png: image not found"):
        infer.main(base + ["--image", str(tmp_path / "nowhere.png"), "--prompt", "Hi"])
    with pytest.raises(SystemExit, match="no such file or directory"):
        infer.main(["--checkpoint", str(tmp_path / "none"), "--image", str(IMAGE), "--prompt", "Hi",
                    "--tokenizer", str(TOKENIZER)])
    for flag in ("--max-new-tokens", "--batch-size", "--max-crops", "--beam-size"):
        with pytest.raises(SystemExit) as exit_info:
            infer.main(base + ["--image", str(IMAGE), "--prompt", "Hi", flag, "0"])
        assert exit_info.value.code == 2 and f"{flag} must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot be combined with sampling"):
        infer.main(base + ["--image", str(IMAGE), "--prompt", "Hi", "--beam-size", "2", "--temperature", "1"])


def test_outputs_are_checked_before_any_work_and_nothing_is_lost(tmp_path):
    """Output paths in a missing folder or naming a folder fail before the model loads; a prompt beyond
    the context is named."""
    base = ["--checkpoint", str(tmp_path / "not_loaded"), "--tokenizer", str(TOKENIZER)]
    with pytest.raises(SystemExit, match=r"--out-image .*: folder .*missing does not exist"):
        infer.main(base + ["--image", str(IMAGE), "--prompt", "Hi", "--out-image", str(tmp_path / "missing" / "p.png")])
    with pytest.raises(SystemExit, match=r"--out .*: is a directory"):
        infer.main(base + ["--batch", str(IMAGE), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"exceeds the model's context of \d+ tokens \(llm.max_sequence_length\)"):
        infer.main(["--checkpoint", str(QWEN), "--tokenizer", str(TOKENIZER), "--image", str(IMAGE), "--prompt",
                    "Hi", "--max-new-tokens", "100000"])


def test_a_bad_batch_record_costs_only_its_own_line(tmp_path, capsys):
    """Every kind of bad record (not UTF-8, not JSON, missing fields, missing or broken image, a prompt
    beyond the context) gets an error in its own output line, in order; the good ones are answered as
    if alone; an existing --out is replaced only when the batch is done; exit status 1."""
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = json.dumps({"image": str(IMAGE), "prompt": "Describe this image."}).encode()
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\n".join([
        good, b"{not json", b'{"prompt": "caf\xe9"}', json.dumps({"image": str(IMAGE)}).encode(),
        json.dumps({"image": "missing.png", "prompt": "ok"}).encode(),
        json.dumps({"image": "broken.png", "prompt": "ok"}).encode(),
        json.dumps({"image": str(IMAGE), "prompt": "word " * 5000}).encode(), good]) + b"\n")
    out = tmp_path / "answers.jsonl"
    out.write_text("earlier answers\n")
    status = infer.main(["--checkpoint", str(QWEN), "--tokenizer", str(TOKENIZER), "--batch", str(requests),
                         "--out", str(out), "--max-new-tokens", "8", "--batch-size", "3"])
    assert status == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 9))
    errors = {r["line"]: r["error"] for r in rows if "error" in r}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7]
    for line, words in ((2, "not valid JSON"), (3, "not UTF-8"), (4, "expected a string field \"prompt\""),
                        (5, "missing.png not found"), (6, "broken.png"), (7, "exceeds the model's context")):
        assert words in errors[line], (line, errors[line])
    for row in (rows[0], rows[7]):
        assert row["tokens"] == expected()["greedy_tokens"][:8].tolist()
    assert "6 of 8 records failed" in capsys.readouterr().err


def test_bad_requests_name_the_request():
    with pytest.raises(ValueError, match="request 1: no 'prompt'"):
        answerer().ask_many([(str(IMAGE), "a"), {"image": str(IMAGE)}])
    with pytest.raises(ValueError, match="request 0: expected"):
        answerer().ask_many(["just a string"])
