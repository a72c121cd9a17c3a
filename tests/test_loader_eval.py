"""Evaluation examples from the synthetic test split: prompt only, ground truth in metadata."""
import numpy as np
import pytest

import input_pipeline
from input_pipeline import datasets, evaluation
from input_pipeline.builders.synthetic import load_example
from molmo_jax import config as config_lib
from molmo_jax.preprocess import MolmoTokenizer, Preprocessor

SIZES = {"train": 2, "validation": 2, "test": 30}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eval"))


def _all(name, data_dir, **kw):
    return list(evaluation.make_eval_examples(name, "test", data_dir=data_dir, split_sizes=SIZES, **kw))


def test_every_task_has_examples_with_prompt_only_conversations(data_dir):
    for name, (style, task) in evaluation.TASKS.items():
        examples = _all(name, data_dir)
        assert examples, name
        for ex in examples:
            (conv,) = ex["message_list"]
            assert conv["style"] == style and not {"points", "answer", "answers", "text"} & set(conv)
            assert ex["metadata"]["task"] == task and ex["image"].dtype == np.uint8
            assert ex["metadata"]["image_size"] == [ex["image"].shape[1], ex["image"].shape[0]]


def test_ground_truth_matches_the_rendered_scene(data_dir):
    source = datasets.open_source(datasets.ensure_synthetic(data_dir, SIZES), "test")
    scenes = {}
    for i in range(len(source)):
        example = load_example(source[i])
        scenes[example["metadata"]["index"]] = example
    for ex in _all("synthetic_pointing", data_dir) + _all("synthetic_counting", data_dir):
        _, index, k = ex["metadata"]["example_id"].split("/")
        truth = scenes[int(index)]["message_list"][int(k)]
        assert truth["label"] == ex["message_list"][0]["label"]
        if ex["metadata"]["task"] == "counting":
            assert ex["metadata"]["count"] == len(truth["points"])
        else:
            np.testing.assert_allclose(np.reshape(ex["metadata"]["points"], (-1, 2)), truth["points"], atol=0.01)
            assert len(ex["metadata"]["mask"]) == len(truth["points"])
            for (x, y), (bx, by, bw, bh) in zip(ex["metadata"]["points"], ex["metadata"]["mask"]):
                assert bx <= x <= bx + bw and by <= y <= by + bh
    for ex in _all("synthetic_clocks", data_dir):
        meta = ex["metadata"]
        assert meta["answers"] == [f"{meta['hour']}:{meta['minute']:02d}"]


def test_examples_feed_the_inference_preprocessor(data_dir):
    cfg = config_lib.tiny()
    pre = Preprocessor(cfg, MolmoTokenizer(input_pipeline.TINY_TOKENIZER, cfg.llm.vocab_size))
    tok = pre.tokenizer
    for ex in _all("synthetic_qa", data_dir, limit=3):
        out = pre(ex, for_inference=True, seed=ex["metadata"]["seed"])
        text = tok.decode(out["input_ids"], truncate_at_eos=False)
        assert text.endswith(" Assistant:") and ex["message_list"][0]["question"] in text
        assert np.all(out["loss_masks"] <= 0)
    assert len(_all("synthetic_counting", data_dir, limit=2)) == 2
    ids = [e["metadata"]["example_id"] for e in _all("synthetic_charts", data_dir)]
    assert ids == [e["metadata"]["example_id"] for e in _all("synthetic_charts", data_dir)] and len(set(ids)) == len(ids)
    with pytest.raises(KeyError, match="unknown evaluation task 'synthetic_dogs'"):
        _all("synthetic_dogs", data_dir)
