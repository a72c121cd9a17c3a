"""Whole examples against the golden files, truncation, the collator and the command line."""
import json
import subprocess
import sys

import numpy as np
import pytest

from molmo_jax.config import get_config, tiny
from molmo_jax.preprocess import Collator, MolmoTokenizer, Preprocessor, SequenceError, default_seq_buckets
from molmo_jax.weights.mappings.molmo import config_from_original

GOLDEN_NAMES = ["img_50x80", "img_336x336", "img_480x640", "img_1000x300", "img_224x1500", "img_700x700"]


@pytest.fixture(scope="module")
def tok_dir(golden_dir):
    return golden_dir / "tiny-qwen2-style-tokenizer"


@pytest.fixture(scope="module")
def pre_7b(tok_dir):
    cfg = get_config("molmo_7b_d")
    return Preprocessor(cfg, MolmoTokenizer(str(tok_dir), cfg.llm.vocab_size))


def _golden_model(golden_dir, tok_dir, name):
    d = golden_dir / "models" / name
    cfg = config_from_original(json.load(open(d / "config.json")))
    pre = Preprocessor(cfg, MolmoTokenizer(str(tok_dir), cfg.llm.vocab_size))
    return pre, json.load(open(d / "meta.json")), np.load(d / "inputs.npz")


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_preprocess_full_example(golden_dir, pre_7b, name):
    g = np.load(golden_dir / "preprocess" / f"{name}.npz")
    prompt = json.load(open(golden_dir / "preprocess" / "settings.json"))["prompt"]
    ex = pre_7b({"image": golden_dir / "preprocess" / f"{name}.png",
                 "message_list": [{"style": "demo", "question": prompt}]}, for_inference=True)
    for key in ("input_ids", "target_tokens", "loss_masks", "position_ids", "image_input_idx",
                "image_masks", "tiling"):
        np.testing.assert_array_equal(ex[key], g[key], err_msg=key)
    assert np.abs(ex["images"] - g["images"]).max() <= 2e-6
    assert ex["input_ids"].dtype == np.int32 and ex["loss_masks"].dtype == np.float32


@pytest.mark.parametrize("name", ["olmo_style", "qwen2_style"])
def test_golden_model_inputs_inference_training_and_batch(golden_dir, tok_dir, name):
    pre, meta, g = _golden_model(golden_dir, tok_dir, name)
    conv = {"style": "demo", "question": meta["prompt"]}
    ex = pre({"image": g["image_raw"], "message_list": [conv]}, for_inference=True)
    assert ex["metadata"]["messages"] == [meta["formatted_inference_messages"]]
    for key in ("input_ids", "image_masks", "image_input_idx", "position_ids"):
        np.testing.assert_array_equal(ex[key], g[key][0], err_msg=key)
    assert np.abs(ex["images"] - g["images"][0]).max() <= 2e-6
    np.testing.assert_array_equal(ex["tiling"], g["tiling"])

    train = pre({"image": g["image_raw"], "message_list": [dict(conv, answer=meta["answer"])]})
    assert train["metadata"]["messages"] == [meta["formatted_training_messages"]]
    for key, gkey in (("input_ids", "loss_input_ids"), ("target_tokens", "loss_labels"),
                      ("loss_masks", "loss_masks"), ("position_ids", "loss_position_ids")):
        np.testing.assert_array_equal(train[key], g[gkey][0], err_msg=key)

    ex2 = pre({"image": g["image2_raw"], "message_list": [{"style": "demo", "question": meta["prompt2"]}]},
              for_inference=True)
    np.testing.assert_array_equal(ex2["tiling"], g["image2_tiling"])
    batch = Collator()([ex, ex2])
    for key in ("input_ids", "image_masks", "image_input_idx", "position_ids"):
        np.testing.assert_array_equal(batch[key], g["batch2_" + key], err_msg=key)
    assert np.abs(batch["images"] - g["batch2_images"]).max() <= 2e-6
    assert batch["input_ids"].dtype == np.int32 and batch["images"].dtype == np.float32
    assert "subsegment_ids" not in batch


@pytest.fixture(scope="module")
def pre_tiny(tok_dir):
    cfg = tiny()
    return Preprocessor(cfg, MolmoTokenizer(str(tok_dir), cfg.llm.vocab_size))


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_image_marker_places_the_block_after_it(pre_tiny):
    tok = pre_tiny.tokenizer
    ex = pre_tiny({"image": _img(60, 90), "message_list": [{"style": "demo", "question": "<|image|> What?"}]},
                  for_inference=True)
    ids = ex["input_ids"]
    marker = int(np.flatnonzero(ids == tok.image)[0])
    assert ids[0] == tok.bos_id and ids[marker + 1] == tok.im_start
    assert ex["image_input_idx"][ex["image_input_idx"] >= 0].min() == marker + 2   # <im_start>, then the first patch
    np.testing.assert_array_equal(ids[ex["image_input_idx"][0]], tok.im_patch)
    with pytest.raises(SequenceError, match="2 <|image|> marker"):
        pre_tiny({"image": _img(60, 90), "message_list": [{"style": "demo", "question": "<|image|><|image|>"}]},
                 for_inference=True)


def test_text_only_and_weighted_examples(pre_tiny):
    ex = pre_tiny({"message_list": [{"style": "demo", "question": "Hi", "answer": "Hello"}], "weight": 0.5})
    assert "images" not in ex and ex["input_ids"][0] == pre_tiny.tokenizer.bos_id
    assert set(np.unique(ex["loss_masks"])) == {0.0, 0.5}
    assert ex["target_tokens"][-1] == pre_tiny.tokenizer.eos_id and ex["loss_masks"][-1] == 0.5


def test_truncation_keeps_the_image_block(pre_tiny):
    long_answer = " ".join(["word"] * 200)
    ex = pre_tiny({"image": _img(60, 90), "message_list": [{"style": "demo", "question": "Q", "answer": long_answer}]})
    n_image = int(ex["image_input_idx"].max()) + 1
    cut = n_image + 20
    batch = Collator(seq_buckets=(cut,))([ex])
    assert batch["input_ids"].shape == (1, cut)
    np.testing.assert_array_equal(batch["input_ids"][0], ex["input_ids"][:cut])
    np.testing.assert_array_equal(batch["loss_masks"][0], ex["loss_masks"][:cut])
    np.testing.assert_array_equal(batch["target_tokens"][0, :-1], batch["input_ids"][0, 1:])  # still aligned
    with pytest.raises(SequenceError, match="cuts into the image tokens"):
        Collator(seq_buckets=(n_image - 5,))([ex])


def test_collator_buckets_bound_the_shapes(pre_tiny):
    cfg = tiny()
    col = Collator.from_config(cfg, 1024, crop_buckets=(3, 5), batch_size=4)
    assert col.seq_buckets == (256, 512, 1024)
    shapes = set()
    sizes = [(40, 40), (60, 200), (200, 60), (300, 300), (100, 100)]
    for k, (h, w) in enumerate(sizes):
        exs = [pre_tiny({"image": _img(h, w, k), "message_list": [{"style": "demo", "question": "Q " * (j * 30 + 1),
                                                                    "answer": "A"}]}) for j in range(k % 3 + 1)]
        batch = col(exs)
        shapes.add((batch["input_ids"].shape, batch["images"].shape))
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] in col.seq_buckets
        assert batch["images"].shape[1] in (3, 5)
        assert np.all(batch["input_ids"][len(exs):] == -1) and np.all(batch["images"][len(exs):] == -1)
        assert np.all(batch["loss_masks"][len(exs):] == -1)
    assert len(shapes) <= len(col.seq_buckets) * 2
    assert default_seq_buckets(2304) == (256, 512, 1024, 2048, 2304)
    with pytest.raises(ValueError, match="crop count 5 exceeds the largest bucket 3"):
        Collator(crop_buckets=(3,))([pre_tiny({"image": _img(300, 300), "message_list": [
            {"style": "demo", "question": "Q", "answer": "A"}]})])


def test_cli_matches_golden(golden_dir, tok_dir, tmp_path):
    out = tmp_path / "out.npz"
    res = subprocess.run([sys.executable, "-m", "tools.preprocess", "--model", "molmo_7b_d", "--tokenizer",
                          str(tok_dir), "--image", str(golden_dir / "preprocess" / "img_1000x300.png"),
                          "--prompt", "Describe this image.", "--out", str(out), "--vocab-size", "152064"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got, g = np.load(out), np.load(golden_dir / "preprocess" / "img_1000x300.npz")
    for key in ("input_ids", "image_masks", "image_input_idx", "tiling"):
        np.testing.assert_array_equal(got[key], g[key], err_msg=key)
        assert got[key].dtype == g[key].dtype
    assert np.abs(got["images"] - g["images"]).max() <= 2e-6


def test_cli_errors_are_one_line(golden_dir, tok_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    res = subprocess.run([sys.executable, "-m", "tools.preprocess", "--model", "molmo_7b_d", "--tokenizer",
                          str(tok_dir), "--image", str(bad), "--prompt", "Hi", "--out", str(tmp_path / "o.npz"),
                          "--max-crops", "36"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "bad.png" in res.stderr and "Traceback" not in res.stderr


def test_preprocessor_pickles_for_worker_processes(pre_tiny):
    """grain sends the transform to its worker processes by pickling it."""
    import pickle

    clone = pickle.loads(pickle.dumps(pre_tiny))
    ex = {"image": _img(80, 120), "message_list": [{"style": "vqa2", "question": "Q?", "answer": "A"}]}
    a, b = pre_tiny(ex, np.random.default_rng(0)), clone(ex, np.random.default_rng(0))
    for key in ("input_ids", "target_tokens", "loss_masks", "images", "image_input_idx"):
        np.testing.assert_array_equal(a[key], b[key])
