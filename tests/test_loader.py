"""The grain training loader: synthetic PixMo batches, determinism, resuming, workers, processes."""
import json
import re

import numpy as np
import pytest

import input_pipeline
from configs import tiny_pretrain, tiny_sft
from molmo_jax.preprocess import MolmoTokenizer

SIZES = "train=24,validation=4,test=4"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def _config(module, data_dir, **data):
    c = module.get_config()
    c.data.update(kind="synthetic", data_dir=data_dir)
    c.data.synthetic_split_sizes = SIZES
    for key, value in data.items():
        c.data[key] = value
    return c


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _texts(batch, cfg):
    tok = MolmoTokenizer(input_pipeline.TINY_TOKENIZER, cfg.model.llm.vocab_size)
    return [tok.decode([t for t in row if 0 <= t < tok.vocab_size], truncate_at_eos=False) for row in batch["input_ids"]]


def test_stage1_batches_pack_caption_and_transcript_with_length_hints(data_dir):
    cfg = _config(tiny_pretrain, data_dir)
    batch = next(input_pipeline.make_train_iterator(cfg))
    n_crops = 1 + cfg.model.image.max_crops
    assert batch["input_ids"].shape == (4, 512) and batch["images"].shape[:2] == (4, n_crops)
    assert set(batch) == {"input_ids", "target_tokens", "loss_masks", "position_ids", "subsegment_ids", "images",
                          "image_masks", "image_input_idx"}
    for row, text in enumerate(_texts(batch, cfg)):
        assert "long_caption" in text and "transcript" in text and "User:" not in text
        assert set(np.unique(batch["subsegment_ids"][row])) == {-1, 1, 2, 10000}
    # Stage 1 has no root_subsegments rescaling: loss weights are 0 or 1.
    assert set(np.unique(batch["loss_masks"])) <= {-1.0, 0.0, 1.0}


def test_stage2_batches_hold_task_conversations_and_some_captions(data_dir):
    """Stage 2 draws 15% of its examples from the captions (the original keeps PixMo-Cap in its
    stage-2 mixture), formatted the stage-2 way: chat roles, no stage-1 length hints."""
    cfg = _config(tiny_sft, data_dir)
    batches = _take(input_pipeline.make_train_iterator(cfg), 12)
    texts = [t for b in batches for t in _texts(b, cfg)]
    assert all("User:" in t and "Assistant:" in t for t in texts)
    assert not any(re.search(r"long_caption \d+:", t) for t in texts)
    captions = sum("The image shows" in t for t in texts)
    assert 0 < captions <= len(texts) // 3, (captions, len(texts))
    joined = " ".join(texts)
    assert "<point" in joined or "There are none." in joined
    weights = np.concatenate([b["loss_masks"][b["loss_masks"] > 0] for b in batches])
    assert np.any(weights < 1.0)  # sqrt(1/k) for packed examples (root_subsegments)


def test_resume_from_state_gives_the_uninterrupted_batches(data_dir):
    cfg = _config(tiny_sft, data_dir)
    straight = _take(input_pipeline.make_train_iterator(cfg), 5)
    first = input_pipeline.make_train_iterator(cfg)
    _take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # it travels in the checkpoint's JSON meta
    assert state["next_batch"] == 3
    resumed = input_pipeline.make_train_iterator(cfg)
    resumed.set_state(state)
    for want, got in zip(straight[3:], _take(resumed, 2)):
        _same(want, got)


def test_workers_do_not_change_the_batches(data_dir):
    """A state saved after 2 batches without workers, resumed with 2 worker processes (one batch
    each, round-robin), continues with exactly the batches of the run without workers."""
    plain = input_pipeline.make_train_iterator(_config(tiny_pretrain, data_dir))
    _take(plain, 2)
    state = json.loads(json.dumps(plain.get_state()))
    expected = _take(plain, 3)
    with_workers = input_pipeline.make_train_iterator(_config(tiny_pretrain, data_dir, num_workers=2))
    try:
        with_workers.set_state(state)
        for want, got in zip(expected, _take(with_workers, 3)):
            _same(want, got)
        assert with_workers.get_state()["next_batch"] == 5
    finally:
        with_workers.close()


def test_processes_share_one_global_batch(data_dir):
    cfg = _config(tiny_sft, data_dir)
    whole = _take(input_pipeline.make_train_iterator(cfg, 0, 1), 2)
    halves = [_take(input_pipeline.make_train_iterator(cfg, p, 2), 2) for p in (0, 1)]
    for step in range(2):
        for key in ("input_ids", "loss_masks", "images", "image_input_idx"):
            np.testing.assert_array_equal(whole[step][key][:2], halves[0][step][key])
            np.testing.assert_array_equal(whole[step][key][2:], halves[1][step][key])
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        input_pipeline.make_train_iterator(cfg, 0, 3)


def test_seed_changes_the_data(data_dir):
    a = next(input_pipeline.make_train_iterator(_config(tiny_sft, data_dir)))
    cfg = _config(tiny_sft, data_dir)
    cfg.data.seed = 1
    b = next(input_pipeline.make_train_iterator(cfg))
    assert not np.array_equal(a["input_ids"], b["input_ids"])


def test_random_kind_still_works_and_unknown_kind_is_an_error(data_dir):
    cfg = _config(tiny_sft, data_dir)
    cfg.data.kind = "random"
    assert next(input_pipeline.make_train_iterator(cfg))["input_ids"].shape == (4, 512)
    cfg.data.kind = "webdataset"
    with pytest.raises(ValueError, match="data.kind='webdataset' is not available"):
        input_pipeline.make_train_iterator(cfg)


def test_tokenizer_is_required_for_real_models(data_dir):
    cfg = _config(tiny_sft, data_dir)
    cfg.model.name = "molmo_7b_d"
    with pytest.raises(ValueError, match="config.data.tokenizer is not set"):
        input_pipeline.tokenizer_dir(cfg)
    cfg.data.tokenizer = "/some/where"
    assert input_pipeline.tokenizer_dir(cfg) == "/some/where"


def test_a_missing_tokenizer_fails_before_any_batch(data_dir, tmp_path):
    cfg = _config(tiny_sft, data_dir)
    cfg.data.tokenizer = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        input_pipeline.make_train_iterator(cfg)
