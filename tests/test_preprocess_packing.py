"""Several conversations about one image packed into one sequence (docs/architecture.md#packing).

Property: for every conversation, the packed sequence gives the same loss-bearing targets with
the same weights (times sqrt(1/N)), the same position ids and the same visible context under the
attention rule (causal & seg[q] <= seg[k] & valid) as that conversation preprocessed alone; and
the model's logits on those tokens agree.
"""
import math

import numpy as np
import pytest

from molmo_jax.config import tiny
from molmo_jax.preprocess import IMAGE_SUBSEGMENT, Collator, FormatSettings, MolmoTokenizer, Preprocessor
from molmo_jax.preprocess.sequence import packed_position_ids

WORDS = "red blue circle square the a is of and image shows small big left right".split()


@pytest.fixture(scope="module")
def pre(golden_dir):
    cfg = tiny()
    return Preprocessor(cfg, MolmoTokenizer(str(golden_dir / "tiny-qwen2-style-tokenizer"), cfg.llm.vocab_size))


def _random_conversations(rng, n):
    """Styles with a fixed prefix (vqa2, chart_qa, ...) so formatting does not depend on the RNG."""
    convs = []
    for k in range(n):
        q = " ".join(rng.choice(WORDS, rng.integers(2, 8)))
        a = " ".join(rng.choice(WORDS, rng.integers(1, 10)))
        style = ["vqa2", "chart_qa", "doc_qa", "synthetic_qa"][k % 4]
        if style == "synthetic_qa":
            convs.append({"style": style, "messages": [q + "?", a, "and " + q + "?", a + " too"]})
        else:
            convs.append({"style": style, "question": q + f" {k}?", "answer": a})
    return convs


def _visible(seg, valid, q):
    """Key positions query q may attend to (the model's rule, docs/architecture.md#packing)."""
    k = np.arange(q + 1)
    return k[(seg[q] <= seg[k]) & valid[k]]


def _check_packing(pre, convs, image, seed):
    packed = pre({"image": image, "message_list": convs}, np.random.default_rng(seed))
    n = len(convs)
    seg = packed["subsegment_ids"]
    ids = packed["input_ids"]
    pos = packed["position_ids"]
    assert seg[0] == IMAGE_SUBSEGMENT and sorted(set(seg.tolist())) == list(range(1, n + 1)) + [IMAGE_SUBSEGMENT]
    valid = ids != -1
    order = packed["metadata"]["messages"]                       # conversations in packed (shuffled) order
    singles = {tuple(m): pre({"image": image, "message_list": [c]}) for c in convs
               for m in pre.format_messages({"message_list": [c]}, np.random.default_rng(0), False)}
    for s, msgs in enumerate(order, start=1):
        alone = singles[tuple(msgs)]
        loss_p = np.flatnonzero((packed["loss_masks"] > 0) & (seg == s))
        loss_a = np.flatnonzero(alone["loss_masks"] > 0)
        assert len(loss_p) == len(loss_a) > 0
        np.testing.assert_array_equal(packed["target_tokens"][loss_p], alone["target_tokens"][loss_a])
        np.testing.assert_allclose(packed["loss_masks"][loss_p],
                                   alone["loss_masks"][loss_a] * np.float32(math.sqrt(1 / n)), rtol=1e-6)
        np.testing.assert_array_equal(pos[loss_p], alone["position_ids"][loss_a])
        for qp, qa in zip(loss_p, loss_a):
            keys = _visible(seg, valid, qp)
            assert len(keys) == qa + 1                            # alone, a query sees every earlier token
            np.testing.assert_array_equal(ids[keys], alone["input_ids"][:qa + 1])
            np.testing.assert_array_equal(pos[keys], alone["position_ids"][:qa + 1])
    # No loss on a token whose input comes from another conversation or from the image block.
    assert np.all(packed["loss_masks"][seg == IMAGE_SUBSEGMENT] == 0)
    return packed, singles


@pytest.mark.parametrize("seed", range(6))
def test_packing_equals_separate_examples(pre, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    image = rng.integers(0, 256, (int(rng.integers(30, 300)), int(rng.integers(30, 300)), 3), np.uint8)
    _check_packing(pre, _random_conversations(rng, n), image, seed)


def test_packed_positions_and_order_shuffle(pre):
    seg = np.array([10000, 10000, 10000, 1, 1, 2, 2, 2, 3], np.int32)
    np.testing.assert_array_equal(packed_position_ids(seg), [0, 1, 2, 3, 4, 3, 4, 5, 3])
    convs = _random_conversations(np.random.default_rng(0), 4)
    orders = {tuple(tuple(m) for m in pre({"message_list": convs}, np.random.default_rng(s))["metadata"]["messages"])
              for s in range(12)}
    assert len(orders) > 1                                        # training shuffles the conversations


def test_single_conversation_is_not_packed_and_stage1_has_no_weighting(pre):
    ex = pre({"message_list": [{"style": "vqa2", "question": "Q", "answer": "A"}]})
    assert "subsegment_ids" not in ex and set(np.unique(ex["loss_masks"])) == {0.0, 1.0}
    stage1 = Preprocessor(pre.cfg, pre.tokenizer, FormatSettings.stage1())
    ex = stage1({"message_list": [{"style": "long_caption", "text": "a cat"}, {"style": "transcript", "text": "um"}]})
    assert set(np.unique(ex["loss_masks"])) == {0.0, 1.0} and "subsegment_ids" in ex


def test_packed_inference_and_weights_are_rejected(pre):
    convs = _random_conversations(np.random.default_rng(0), 2)
    with pytest.raises(ValueError, match="inference format takes one conversation"):
        pre({"message_list": convs}, for_inference=True)
    with pytest.raises(ValueError, match="weight cannot be combined"):
        pre({"message_list": convs, "weight": 2.0})


def _random_model(cfg, seed=0):
    """A Molmo with random parameters, built from arrays (the eager random init is much slower)."""
    from molmo_jax import weights

    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in weights.params.param_paths(cfg).items():
        n = rng.standard_normal(shape).astype(np.float32)
        flat[path] = {"weight": 1 + 0.1 * n, "bias": 0.1 * n, "kernel": 0.15 * n}.get(path[-1], 0.5 * n)
    return weights.params.model_from_flat(cfg, flat)


def test_model_logits_of_packed_and_separate_examples_agree(pre):
    """One forward of a batch [packed, conv 1 alone, conv 2 alone, conv 3 alone] (one compile): the
    logits at every loss-bearing token of each conversation must agree."""
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(7)
    convs = _random_conversations(rng, 3)
    image = rng.integers(0, 256, (90, 160, 3), np.uint8)
    packed, singles = _check_packing(pre, convs, image, seed=7)
    order = [singles[tuple(m)] for m in packed["metadata"]["messages"]]
    batch = Collator()([packed] + order)
    assert np.all(batch["subsegment_ids"][1:][batch["input_ids"][1:] != -1] == 1)
    model = _random_model(pre.cfg)

    @nnx.jit
    def forward(model, subsegment_ids):
        return model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["images"]),
                     jnp.asarray(batch["image_masks"]), jnp.asarray(batch["image_input_idx"]),
                     position_ids=jnp.asarray(batch["position_ids"]), subsegment_ids=subsegment_ids)["logits"]

    logits = np.asarray(forward(model, jnp.asarray(batch["subsegment_ids"])))
    seg = batch["subsegment_ids"][0]
    for s, alone in enumerate(order, start=1):
        loss_p = np.flatnonzero((batch["loss_masks"][0] > 0) & (seg == s))
        loss_a = np.flatnonzero(alone["loss_masks"] > 0)
        np.testing.assert_allclose(logits[0, loss_p], logits[s, loss_a], atol=1e-5, rtol=0)
    # Sanity: without the subsegment rule (all ids equal) later conversations would see earlier ones.
    leak = np.asarray(forward(model, jnp.ones_like(jnp.asarray(batch["subsegment_ids"]))))
    last = np.flatnonzero((batch["loss_masks"][0] > 0) & (seg == 3))
    assert np.abs(leak[0, last] - logits[0, last]).max() > 1e-3
