"""Generation: the golden greedy decodes, cache == no cache, padded batches, sampling, beam search,
stop strings, MoE decoders, and a sharded model."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import GOLDEN
from molmo_jax import config as config_lib
from molmo_jax import generate as gen_lib
from molmo_jax import models as model_lib
from molmo_jax import sharding, weights
from molmo_jax.preprocess import MolmoTokenizer

EOS = 384  # the golden tokenizer's <|endoftext|>
MODELS = ["olmo_style", "qwen2_style"]


@functools.lru_cache(maxsize=None)
def setup(name):
    path = GOLDEN / "models" / name
    cfg, model = weights.load(path)
    return cfg, model, gen_lib.Generator(model, EOS), dict(np.load(path / "inputs.npz")), dict(np.load(path / "expected.npz"))


def batch2(inp):
    return {k[len("batch2_"):]: v for k, v in inp.items() if k.startswith("batch2_")}


@pytest.mark.parametrize("name", MODELS)
def test_golden_greedy_decode(name):
    _, _, gen, inp, exp = setup(name)
    out = gen(inp, gen_lib.Sampling(max_new_tokens=16), return_logits=True)
    np.testing.assert_array_equal(out["tokens"][0], exp["greedy_tokens"])
    np.testing.assert_allclose(out["step_logits"][0], exp["greedy_step_logits"], atol=1e-4, rtol=0)
    # the score is the sum of the chosen tokens' log-probs, as the reference generate() returns it
    np.testing.assert_allclose(out["scores"][0], exp["greedy_score"], atol=1e-3, rtol=0)
    assert out["finish"][0] == "length" and out["lengths"][0] == 16


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


def test_sampling_settings_are_checked():
    for bad in (dict(max_new_tokens=0), dict(top_p=0.0), dict(beam_size=0), dict(temperature=-1.0),
                dict(beam_size=2, temperature=0.5), dict(stop_strings=("",))):
        with pytest.raises(ValueError, match="Sampling: "):
            gen_lib.Sampling(**bad)
    _, _, gen, inp, _ = setup("olmo_style")
    with pytest.raises(ValueError, match="detokenize"):
        gen(inp, gen_lib.Sampling(max_new_tokens=4, stop_strings=("x",)))
    with pytest.raises(ValueError, match="return_logits needs beam_size 1"):
        gen(inp, gen_lib.Sampling(max_new_tokens=4, beam_size=2), return_logits=True)
    with pytest.raises(ValueError, match="input_ids"):
        gen({"images": inp["images"]}, gen_lib.Sampling(max_new_tokens=4))


# ------------------------------------------------------------------------------------------------
# Beam search

def reference_beam_search(model, b, row, k, n, eos):
    """Beam search written out plainly: one full forward (images, no cache) per step for the live
    beams; a finished beam is carried over unchanged and competes on its score."""
    graphdef, state = nnx.split(model)
    img = {key: np.repeat(b[key][row:row + 1], k, axis=0) for key in ("images", "image_masks", "image_input_idx")}

    @jax.jit
    def log_probs(state, ids, at):
        logits = nnx.merge(graphdef, state)(ids, img["images"], img["image_masks"], img["image_input_idx"])["logits"]
        return jax.nn.log_softmax(logits[:, at])

    prompt = b["input_ids"][row][b["input_ids"][row] != -1]
    t = len(prompt)
    beams = [((), 0.0, False)]
    for step in range(n):
        live = [bm for bm in beams if not bm[2]]
        if not live:
            break
        buf = np.full((k, t + n), -1, np.int32)
        buf[:, :t] = prompt
        for i, (toks, _, _) in enumerate(live):
            buf[i, t:t + step] = toks
        lp = np.asarray(log_probs(state, buf, t + step - 1), np.float64)
        cands = [bm for bm in beams if bm[2]]
        for i, (toks, score, _) in enumerate(live):
            for v in np.argsort(-lp[i])[:k]:
                cands.append((toks + (int(v),), score + lp[i, v], int(v) == eos))
        beams = sorted(cands, key=lambda c: -c[1])[:k]
    return beams


def test_beam_search_matches_a_plain_beam_search_on_a_padded_batch():
    """K=3 beams for both prompts of the padded 2-example batch (different lengths and crops); EOS is
    set to a token the model emits early so that some beams finish and keep competing."""
    _, model, _, inp, exp = setup("olmo_style")
    eos = int(exp["greedy_tokens"][2])
    gen = gen_lib.Generator(model, eos)
    b = batch2(inp)
    k, n = 3, 6
    out = gen(b, gen_lib.Sampling(max_new_tokens=n, beam_size=k))
    lp = gen(b, gen_lib.Sampling(max_new_tokens=n, beam_size=k, length_penalty=1.0))
    finished = 0
    for row in range(2):
        ref = reference_beam_search(model, b, row, k, n, eos)
        order = np.argsort(-out["beam_scores"][row])
        for got_tokens, got_score, (toks, score, _) in zip(out["beam_tokens"][row][order],
                                                            out["beam_scores"][row][order], ref):
            assert tuple(int(t) for t in got_tokens if t >= 0) == toks
            np.testing.assert_allclose(got_score, score, atol=1e-3, rtol=0)
        finished += sum(toks[-1] == eos for toks, _, _ in ref)
        best = ref[0]
        assert tuple(int(t) for t in out["tokens"][row] if t >= 0) == best[0]
        assert out["finish"][row] == ("eos" if best[2] else "length")
        # length penalty 1: the same beams, ranked by mean log-prob
        normed = {toks: score / len(toks) for toks, score, _ in ref}
        got = {tuple(int(t) for t in tk if t >= 0): s for tk, s in zip(lp["beam_tokens"][row], lp["beam_scores"][row])}
        assert got.keys() == normed.keys()
        for toks, score in normed.items():
            np.testing.assert_allclose(got[toks], score, atol=1e-3, rtol=0)
        assert tuple(int(t) for t in lp["tokens"][row] if t >= 0) == max(normed, key=normed.get)
    assert finished > 0, "no beam finished: the EOS path was not exercised"


# ------------------------------------------------------------------------------------------------
# Stop strings

def test_stop_strings_cut_rows_independently(monkeypatch):
    """A row stops at the token that completes a stop string (checked on the host every few tokens);
    the other rows decode on as without stop strings."""
    _, model, _, inp, _ = setup("qwen2_style")
    tok = MolmoTokenizer(str(GOLDEN / "tiny-qwen2-style-tokenizer"), 512)
    gen = gen_lib.Generator(model, EOS, detokenize=tok.decode)
    b = batch2(inp)
    plain = gen(b, gen_lib.Sampling(max_new_tokens=16))
    stops = ("picture",)
    monkeypatch.setattr(gen_lib, "STOP_CHECK_EVERY", 3)
    out = gen(b, gen_lib.Sampling(max_new_tokens=16, stop_strings=stops))
    n_stopped = 0
    for row in range(2):
        full = plain["tokens"][row]
        kept = gen_lib.stop_position(full, stops, tok.decode)
        if kept is None:
            np.testing.assert_array_equal(out["tokens"][row], full)
            assert out["finish"][row] == plain["finish"][row]
            continue
        n_stopped += 1
        assert "picture" in tok.decode(full[:kept]) and "picture" not in tok.decode(full[:kept - 1])
        np.testing.assert_array_equal(out["tokens"][row][:kept], full[:kept])
        assert (out["tokens"][row][kept:] == -1).all() and out["lengths"][row] == kept
        assert out["finish"][row] == "stop"
        assert out["scores"][row] > plain["scores"][row]  # fewer (negative) log-probs summed
    assert n_stopped >= 1
    assert gen_lib.cut_at_stop(" a wit picture- b", stops) == (" a wit ", True)
    assert gen_lib.cut_at_stop("abc", stops) == ("abc", False)


# ------------------------------------------------------------------------------------------------
# Mixture-of-experts decoder

def test_moe_decoder_cache_equals_no_cache():
    """A tiny OLMoE-style decoder (4 experts, top-2, grouped matmuls) on right-padded text prompts."""
    cfg = config_lib.tiny()
    cfg.llm.update(moe_num_experts=4, moe_top_k=2, mlp_dim=32, moe_impl="ragged")
    model = model_lib.create_model(cfg, seed=3)
    model.llm.ff_out.kernel.value = model.llm.ff_out.kernel.value * 10.0  # well separated logits
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 384, size=(2, 10)).astype(np.int32)
    ids[1, 7:] = -1  # row 1 is shorter: right padding
    n = 6
    out = gen_lib.Generator(model, EOS)({"input_ids": ids}, gen_lib.Sampling(max_new_tokens=n), return_logits=True)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)["logits"])
    for row in range(2):
        buf = np.full((1, 10 + n), -1, np.int32)
        length = int((ids[row] != -1).sum())
        buf[0, :length] = ids[row, :length]
        for step in range(n):
            logits = np.asarray(forward(state, buf))[0, length + step - 1]
            np.testing.assert_allclose(out["step_logits"][row, step], logits, atol=1e-4, rtol=0)
            assert out["tokens"][row, step] == int(np.argmax(logits))
            buf[0, length + step] = out["tokens"][row, step]


# ------------------------------------------------------------------------------------------------
# Sharded model

def test_sharded_model_decodes_the_same_tokens():
    """(data=2, fsdp=2, tensor=2) on 8 simulated CPU devices: weights split over fsdp/tensor, the
    4-row batch over data x fsdp, the cache's kv heads over tensor."""
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    _, model, gen, inp, _ = setup("qwen2_style")
    b = batch2(inp)
    b4 = {k: np.concatenate([v, v[::-1]]) for k, v in b.items()}  # rows 0, 1, 1, 0
    want = gen(b4, gen_lib.Sampling(max_new_tokens=10))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = nnx.state(model)
    placed = jax.device_put(state, sharding.param_shardings(state, mesh))
    sharded_model = nnx.merge(nnx.graphdef(model), placed)
    sharded = gen_lib.Generator(sharded_model, EOS, mesh=mesh)
    wq = sharded.layers[0]["attn"]["wq"]["kernel"][...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    got = sharded(b4, gen_lib.Sampling(max_new_tokens=10))
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-3, rtol=0)
