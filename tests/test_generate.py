"""Generation: the golden greedy decodes, cache == no cache, padded batches, sampling."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import GOLDEN
from molmo_jax import generate as gen_lib
from molmo_jax import pretrained

EOS = 384  # the golden tokenizer's <|endoftext|>
MODELS = ["olmo_style", "qwen2_style"]


@functools.lru_cache(maxsize=None)
def setup(name):
    path = GOLDEN / "models" / name
    cfg, model = pretrained.load_pytorch_dir(path)
    return cfg, model, gen_lib.Generator(model, EOS), dict(np.load(path / "inputs.npz")), dict(np.load(path / "expected.npz"))


def batch2(inp):
    return {k[len("batch2_"):]: v for k, v in inp.items() if k.startswith("batch2_")}


@pytest.mark.parametrize("name", MODELS)
def test_golden_greedy_decode(name):
    _, _, gen, inp, exp = setup(name)
    out = gen(inp, gen_lib.Sampling(max_new_tokens=16), return_logits=True)
    np.testing.assert_array_equal(out["tokens"][0], exp["greedy_tokens"])
    np.testing.assert_allclose(out["step_logits"][0], exp["greedy_step_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_cache_equals_no_cache(name):
    """A plain loop of full forwards (with images) + argmax gives the same tokens and logits."""
    _, model, gen, inp, exp = setup(name)
    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, ids, n):
        m = nnx.merge(graphdef, state)
        return m(ids, inp["images"], inp["image_masks"], inp["image_input_idx"])["logits"][0, n - 1]

    ids = inp["input_ids"]
    width = ids.shape[1] + 8
    buf = np.full((1, width), -1, ids.dtype)
    buf[0, :ids.shape[1]] = ids[0]
    n = ids.shape[1]
    steps = []
    for _ in range(8):
        logits = np.asarray(last_logits(state, buf, n))
        steps.append(logits)
        buf[0, n] = int(np.argmax(logits))
        n += 1
    cached = gen(inp, gen_lib.Sampling(max_new_tokens=8), return_logits=True)
    np.testing.assert_array_equal(buf[0, ids.shape[1]:], cached["tokens"][0])
    np.testing.assert_array_equal(buf[0, ids.shape[1]:], exp["greedy_tokens_nocache"][:8])
    np.testing.assert_allclose(np.stack(steps), cached["step_logits"][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_padded_batch_rows_decode_as_alone(name):
    """Prompts of different lengths and crop counts in one call (right padding, -1 crops)."""
    _, _, gen, inp, exp = setup(name)
    b = batch2(inp)
    assert (b["input_ids"] == -1).any()
    out = gen(b, gen_lib.Sampling(max_new_tokens=12))
    np.testing.assert_array_equal(out["tokens"][0], exp["greedy_tokens"][:12])
    # Row 1 alone (its padding removed) decodes the same tokens as inside the batch.
    n = int((b["input_ids"][1] != -1).sum())
    crops = int((~np.all(b["images"][1] == -1, axis=(1, 2))).sum())
    alone = {"input_ids": b["input_ids"][1:, :n], "images": b["images"][1:, :crops],
             "image_masks": b["image_masks"][1:, :crops], "image_input_idx": b["image_input_idx"][1:, :crops]}
    np.testing.assert_array_equal(gen(alone, gen_lib.Sampling(max_new_tokens=12))["tokens"][0], out["tokens"][1])


def test_stops_at_eos():
    _, _, gen, inp, exp = setup("qwen2_style")
    # Pretend the 4th greedy token is EOS: decoding stops right after it.
    gen_eos = gen_lib.Generator(setup("qwen2_style")[1], int(exp["greedy_tokens"][3]))
    out = gen_eos(inp, gen_lib.Sampling(max_new_tokens=16))
    assert out["lengths"][0] == 4
    np.testing.assert_array_equal(out["tokens"][0, :4], exp["greedy_tokens"][:4])
    assert (out["tokens"][0, 4:] == -1).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    _, _, gen, inp, exp = setup("olmo_style")
    a = gen(inp, gen_lib.Sampling(max_new_tokens=10, temperature=1.0, seed=1))["tokens"]
    b = gen(inp, gen_lib.Sampling(max_new_tokens=10, temperature=1.0, seed=1))["tokens"]
    c = gen(inp, gen_lib.Sampling(max_new_tokens=10, temperature=1.0, seed=2))["tokens"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    k1 = gen(inp, gen_lib.Sampling(max_new_tokens=10, temperature=0.7, top_k=1, seed=5))["tokens"]
    np.testing.assert_array_equal(k1[0], exp["greedy_tokens"][:10])
    p0 = gen(inp, gen_lib.Sampling(max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=5))["tokens"]
    np.testing.assert_array_equal(p0[0], exp["greedy_tokens"][:10])
