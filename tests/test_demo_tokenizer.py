"""The demo model's bundled tokenizer (molmo_jax/assets/demo_tokenizer) and the tool that trains it."""
import itertools

import numpy as np
import pytest

import input_pipeline
from configs import demo_pretrain, demo_sft
from input_pipeline import datasets, synthetic
from input_pipeline.builders.base import parse_split_sizes
from molmo_jax.preprocess import MolmoTokenizer
from tools import build_demo_tokenizer

SIZES = "train=96,validation=8,test=8"


@pytest.fixture(scope="module")
def demo_tok():
    c = demo_sft.get_config()
    assert input_pipeline.tokenizer_dir(c) == input_pipeline.DEMO_TOKENIZER
    return MolmoTokenizer(input_pipeline.DEMO_TOKENIZER, c.model.llm.vocab_size)


def test_scene_words_are_single_tokens(demo_tok):
    words = list(synthetic.COLOURS) + [synthetic._plural(s) for s in synthetic.SHAPES]
    words += list(synthetic.SHAPES) + ["point", "colour", "many"] + [str(n) for n in (12, 37, 62, 87)]
    for word in words:
        assert len(demo_tok.encode(" " + word)) == 1 or len(demo_tok.encode(word)) == 1, word


def test_round_trip_and_length(demo_tok):
    tiny = MolmoTokenizer(input_pipeline.TINY_TOKENIZER, 512)
    text = ' <points x1="12.5" y1="37.5" x2="87.5" y2="37.5" alt="purple stars">purple stars</points>'
    ids = demo_tok.encode(text)
    assert demo_tok.decode(ids) == text
    assert len(ids) < 0.6 * len(tiny.encode(text))   # the reason it exists: whole words, short sequences


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("demo_data"))
    c = demo_pretrain.get_config()
    datasets.ensure_synthetic(data_dir, parse_split_sizes(SIZES, ("train", "validation", "test")),
                              input_pipeline.synthetic_options(c))
    return data_dir


@pytest.mark.parametrize("module", [demo_pretrain, demo_sft], ids=["stage1", "stage2"])
def test_demo_sequences_fit_their_seq_len(module, demo_data):
    """The demo configs' seq_len is sized for this tokenizer: stage 1 cuts nothing off, stage 2 at most
    2% of the images (those with the longest pointing answers: the cost of a step grows with seq_len)."""
    c = module.get_config()
    c.data.update(data_dir=demo_data, synthetic_split_sizes=SIZES)
    limit, c.seq_len = c.seq_len, 2 * c.seq_len
    lengths = [int((row >= 0).sum()) for b in itertools.islice(input_pipeline.make_loader(c), 12)
               for row in np.asarray(b["input_ids"])]
    cut = np.mean(np.array(lengths) > limit)
    assert cut <= (0.0 if module is demo_pretrain else 0.02), (cut, sorted(lengths)[-5:], limit)
    assert np.median(lengths) > limit // 2    # and not absurdly long


def test_build_tool_trains_a_byte_level_bpe(tmp_path):
    texts = ["point to the red circles", "How many purple stars are there?", "There are none."] * 20
    tok = build_demo_tokenizer.train_tokenizer(texts, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    molmo_tok = MolmoTokenizer(str(tmp_path), 320)
    assert molmo_tok.base_size <= 300 and molmo_tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert len(molmo_tok.encode(" circles")) == 1
    odd = "émoji ✓ and digits 0123"   # bytes never seen in training still round-trip (byte-level)
    assert molmo_tok.decode(molmo_tok.encode(odd)) == odd


@pytest.mark.parametrize("size", ["200", "4096"])
def test_build_tool_rejects_a_vocab_size_the_demo_model_cannot_hold(size, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_demo_tokenizer.main(["--vocab-size", size, "--out", "/nonexistent/never_written"])
    assert exit_.value.code == 2 and "--vocab-size " + size in capsys.readouterr().err
