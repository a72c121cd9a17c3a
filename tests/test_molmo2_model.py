"""Molmo2 (molmo_jax.models.molmo2) against transformers' Molmo2ForConditionalGeneration, float32 on CPU.

Three tiny random decoders, each built once: "qwen3" (per-head qk-norm), "olmo" (qk-norm over the
whole projection, norm_after, no GQA) and "rope" (YaRN RoPE on one of three layers only). transformers
writes each with `save_pretrained`; molmo_jax reads that directory with `weights.load`, so the mapping
is exercised too. Inputs are built the way transformers' processor lays them out (flat crops,
pooling tables from its own `arange_for_pooling`, image tokens with `mm_token_type_ids`).

Tolerance: both sides compute in float32 and differ only in the order of sums (XLA vs torch matmuls
and softmax): measured <= 1e-5 on logits of magnitude ~4. 1e-4 leaves a wide margin, while a wrong
mask, RoPE or weight moves logits by more than 1e-2 (the negative controls below).
"""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test-only dependencies: molmo_jax itself never imports them
import transformers
from transformers.models.molmo2.image_processing_molmo2 import arange_for_pooling

from molmo_jax import config as config_lib
from molmo_jax import weights
from molmo_jax.generate import Generator, Sampling
from molmo_jax.weights.mappings import molmo2 as molmo2_mapping
from molmo_jax.weights.params import model_from_flat, model_to_flat
from test_hf_parity import randomise

TOL = 1e-4
KINDS = ("qwen3", "olmo", "rope")
CASES = ("one_image", "two_images", "video", "padded_batch")


def tiny_config(kind):
    cfg = config_lib.get_config("molmo2_tiny")
    cfg.attention = "dense"
    if kind == "olmo":
        cfg.llm.update(qk_norm_type="olmo", norm_after=True, n_kv_heads=4)
    elif kind == "rope":  # YaRN with a short original context, so that it changes the frequencies used here
        cfg.llm.update(n_layers=3, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                     beta_fast=8.0, beta_slow=1.0), rope_scaling_layers=(1,))
    return cfg


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (transformers model, its save_pretrained directory, our cfg, our model), built on first use."""
    @functools.lru_cache(maxsize=None)
    def build(kind):
        hf_cfg = transformers.Molmo2Config(**molmo2_mapping.to_released(tiny_config(kind), "float32"))
        hf_cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        hf = randomise(transformers.Molmo2ForConditionalGeneration(hf_cfg), seed=KINDS.index(kind)).eval()
        path = tmp_path_factory.mktemp(f"molmo2_{kind}")
        hf.save_pretrained(path)
        cfg, model = weights.load(path)
        return hf, path, cfg, model
    return build


# ------------------------------------------------------------------------------------------------
# Inputs as transformers' processor lays them out

class Prompt:
    """Token ids, token types and the visual arrays of one example, built piece by piece."""

    def __init__(self, cfg):
        self.t, self.col = cfg.tokens, cfg.llm.vocab_size + 3  # <im_col> sits at vocab + 3
        self.ids, self.types, self.crops, self.pooling, self.grids = [cfg.llm.bos_token_id], [0], [], [], []

    def text(self, *ids):
        self.ids += list(ids)
        self.types += [0] * len(ids)
        return self

    def _block(self, start, end, rows, cols, col_tokens):
        row = [self.t.image_patch] * cols + ([self.col] if col_tokens else [])
        block = [start] + row * rows + [end]
        self.ids += block
        self.types += [1] * len(block)

    def _pool(self, grid, pool, offset):
        idx, rows, cols = arange_for_pooling(torch.as_tensor(grid), *pool)
        self.pooling.append(np.where(idx.numpy() >= 0, idx.numpy() + offset, -1))
        return rows, cols

    def image(self, rng, n_hires, offset):
        """A resized view plus `n_hires` crops stitched side by side, the canvas one patch narrower
        than the crops (as overlap margins drop patches): some pooling windows are partly empty."""
        self.crops.append(rng.standard_normal((1 + n_hires, 16, 588)).astype(np.float32))
        low = self._pool(np.arange(16).reshape(4, 4), (2, 2), offset)
        self._block(self.t.low_res_image_start, self.t.image_end, *low, True)
        canvas = np.concatenate([np.arange(16).reshape(4, 4) + 16 * (1 + k) for k in range(n_hires)], axis=1)
        high = self._pool(canvas[:, :-1], (2, 2), offset)
        self._block(self.t.image_start, self.t.image_end, *high, True)
        self.grids.append([*low, *high])
        return offset + 16 * (1 + n_hires)

    def video(self, rng, n_frames):
        """Frames of 4x4 patches pooled 3x3 (windows padded with empty slots), a timestamp before each."""
        self.crops.append(rng.standard_normal((n_frames, 16, 588)).astype(np.float32))
        for f in range(n_frames):
            rows, cols = self._pool(np.arange(16).reshape(4, 4), (3, 3), 16 * f)
            self.text(20 + f)
            self._block(self.t.frame_start, self.t.frame_end, rows, cols, False)
        self.grids.append([n_frames, rows, cols])
        return self


def batch_of(prompts, video=False):
    """Our batch (right padding -1, every prompt's crops and pooling rows in order, the rows moved
    past the crops of the prompts before) and transformers' (the same arrays, padding id 0 with an
    attention mask)."""
    width = max(len(p.ids) for p in prompts)
    ids = np.full((len(prompts), width), -1, np.int64)
    types = np.zeros_like(ids)
    pooling, offset = [], 0
    for i, p in enumerate(prompts):
        ids[i, :len(p.ids)], types[i, :len(p.types)] = p.ids, p.types
        pooling += [np.where(t >= 0, t + offset, -1) for t in p.pooling]
        offset += sum(c.shape[0] * c.shape[1] for c in p.crops)
    crops = np.concatenate([c for p in prompts for c in p.crops])
    pooling = np.concatenate(pooling).astype(np.int64)
    names = (("pixel_values_videos", "video_token_pooling", "video_grids") if video
             else ("pixel_values", "image_token_pooling", "image_grids"))
    ours = {"input_ids": ids, names[0]: crops, names[1]: pooling, "mm_token_type_ids": types}
    theirs = {"input_ids": np.maximum(ids, 0), "attention_mask": (ids >= 0).astype(np.int64), names[0]: crops,
              names[1]: pooling, names[2]: np.array([g for p in prompts for g in p.grids], np.int64),
              "mm_token_type_ids": types}
    return ours, theirs


def padded_rows(cfg, seed=0):
    """Two prompts of different lengths: a 2-crop image after text, a 1-crop image."""
    rng = np.random.default_rng(seed)
    first = Prompt(cfg).text(5, 6, 7, 8, 9, 10, 11)
    first.image(rng, 2, 0)
    second = Prompt(cfg).text(40)
    second.image(rng, 1, 0)
    return first.text(12), second.text(41)


def case_inputs(cfg, case, seed=0):
    rng = np.random.default_rng(seed)
    if case == "one_image":
        p = Prompt(cfg).text(5, 6)
        p.image(rng, 2, 0)
        return batch_of([p.text(7, 8, 9)])
    if case == "two_images":
        p = Prompt(cfg).text(5)
        end = p.image(rng, 2, 0)
        p.text(30, 31)
        p.image(rng, 1, end)
        return batch_of([p.text(7, 8)])
    if case == "video":
        return batch_of([Prompt(cfg).text(5).video(rng, 3).text(7, 8, 9)], video=True)
    return batch_of(padded_rows(cfg, seed))


def hf_logits(hf, inputs):
    with torch.no_grad():
        out = hf(**{k: torch.as_tensor(v) for k, v in inputs.items()})
    return out.logits.numpy()


def our_logits(model, inputs, **overrides):
    kw = {k: jnp.asarray(v) for k, v in {**inputs, **overrides}.items() if v is not None}
    return np.asarray(model(**kw)["logits"])


def max_diff(ours, theirs, ids):
    valid = ids >= 0
    return float(np.abs(np.where(valid[..., None], ours - theirs, 0)).max())


# ------------------------------------------------------------------------------------------------
# Parity

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(models, kind, case):
    hf, _, cfg, model = models(kind)
    ours_in, theirs_in = case_inputs(cfg, case)
    ref = hf_logits(hf, theirs_in)
    diff = max_diff(our_logits(model, ours_in), ref, ours_in["input_ids"])
    print(f"{kind} {case}: max|diff| {diff:.2e}")
    assert diff <= TOL, diff


def test_padded_rows_give_their_logits_alone(models):
    """Right padding (-1) changes nothing about a row (docs/architecture.md#p14-padded-rows)."""
    _, _, cfg, model = models("qwen3")
    both = our_logits(model, batch_of(padded_rows(cfg))[0])
    for i, row in enumerate(padded_rows(cfg)):
        alone = our_logits(model, batch_of([row])[0])[0]
        # A batch of two and a batch of one take different matmul blockings on AVX-512 CPUs, so the
        # float32 sums round differently: up to 1.2e-5 seen on logits of size ~1. A padding bug (a
        # visible padded key, a shifted position) moves them by more than 1e-2.
        np.testing.assert_allclose(both[i, :len(alone)], alone, atol=5e-5, rtol=0)


def test_negative_controls_would_be_caught(models):
    """What the tolerance guards against: the image tokens' bidirectional group, and RoPE scaled on
    the wrong layers, each move the logits by far more than TOL."""
    hf, _, cfg, model = models("qwen3")
    ours_in, theirs_in = case_inputs(cfg, "two_images")
    causal_only = our_logits(model, ours_in, mm_token_type_ids=None)
    assert max_diff(causal_only, hf_logits(hf, theirs_in), ours_in["input_ids"]) > 1e-2

    hf, _, cfg, model = models("rope")
    ours_in, theirs_in = case_inputs(cfg, "one_image")
    ref = hf_logits(hf, theirs_in)
    for layers in (None, ()):  # every layer scaled; none scaled
        wrong = tiny_config("rope")
        wrong.llm.rope_scaling_layers = layers
        other = model_from_flat(wrong, model_to_flat(model))
        assert max_diff(our_logits(other, ours_in), ref, ours_in["input_ids"]) > 1e-2, layers


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers(models, kind):
    """Our KV-cache decoding of a right-padded batch of two gives, row by row, the tokens of
    transformers' generate (with its cache) on each prompt alone."""
    hf, _, cfg, model = models(kind)
    n_new, eos = 8, cfg.llm.eos_token_id
    out = Generator(model, eos)(batch_of(padded_rows(cfg))[0], Sampling(max_new_tokens=n_new))
    for i, row in enumerate(padded_rows(cfg)):
        _, theirs = batch_of([row])
        with torch.no_grad():
            gen = hf.generate(**{k: torch.as_tensor(v) for k, v in theirs.items()}, max_new_tokens=n_new,
                              do_sample=False, eos_token_id=eos, pad_token_id=0)
        want = gen[0, theirs["input_ids"].shape[1]:].numpy()
        got = out["tokens"][i][:out["lengths"][i]]
        print(f"{kind} row {i}: {got.tolist()}")
        np.testing.assert_array_equal(got, want)


def test_fused_attention_matches_dense(models):
    """model.attention="fused" (splash in Pallas interpret mode here) runs the decoder's causal +
    image-group mask through the kernel's dynamic-mask branch and the ViT's through the static one:
    the same logits as the dense core up to the order of sums (f32)."""
    _, _, cfg, model = models("qwen3")
    fused_cfg = tiny_config("qwen3")
    fused_cfg.attention = "fused"
    fused = model_from_flat(fused_cfg, model_to_flat(model))
    ours_in, _ = case_inputs(cfg, "two_images")
    diff = max_diff(our_logits(fused, ours_in), our_logits(model, ours_in), ours_in["input_ids"])
    assert diff <= 1e-5, diff


def test_training_loss_takes_the_batch_by_name(models):
    """losses.training_loss on a Molmo2 batch (the family's own input names) is the weighted
    cross-entropy of transformers' logits."""
    from molmo_jax import losses

    hf, _, cfg, model = models("olmo")
    ours_in, theirs_in = case_inputs(cfg, "padded_batch")
    ids = ours_in["input_ids"]
    targets = np.where(ids[:, 1:] >= 0, ids[:, 1:], -1)
    targets = np.concatenate([targets, np.full((len(ids), 1), -1)], axis=1)
    weights = (targets >= 0) & (targets < cfg.llm.vocab_size)  # text targets only
    batch = {**ours_in, "target_tokens": targets, "loss_masks": weights.astype(np.float32)}
    total, parts = losses.training_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
    ref = hf_logits(hf, theirs_in).astype(np.float64)
    lse = np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1)
    picked = np.take_along_axis(ref, np.where(weights, targets, 0)[..., None], axis=-1)[..., 0]
    want = float(np.sum((lse - picked) * weights) / np.sum(weights))
    assert abs(float(parts["loss"]) - want) <= 1e-5, (float(parts["loss"]), want)
    assert float(total) > float(parts["loss"])  # the z-loss is added
    molmo_style = dict(batch, images=np.zeros((len(ids), 1, 4, 12), np.float32))  # another family's input
    with pytest.raises(ValueError, match="Molmo2 does not read images"):
        losses.training_loss(model, molmo_style)


def test_token_count_mismatch_is_one_clear_error(models):
    from molmo_jax.models.molmo2 import check_token_counts

    _, _, cfg, _ = models("qwen3")
    ours_in, _ = case_inputs(cfg, "one_image")
    check_token_counts(cfg, ours_in)
    short = dict(ours_in, image_token_pooling=ours_in["image_token_pooling"][:-1])
    with pytest.raises(ValueError, match="image_token_pooling has 11 non-empty rows but input_ids holds 12"):
        check_token_counts(cfg, short)


def test_forward_tool_on_transformers_inputs(models, tmp_path):
    """python -m tools.forward on a save_pretrained directory and transformers' input arrays (the
    grids and crop counts included) writes transformers' logits, also for a left-padded row (whose
    positions transformers' forward counts from the padding, docs/architecture.md#m5-positions-of-a-plain-forward)."""
    from tools import forward

    hf, path, cfg, _ = models("qwen3")
    _, theirs = case_inputs(cfg, "padded_batch")
    theirs["image_num_crops"] = np.array([3, 2])
    pad = int((theirs["attention_mask"][1] == 0).sum())
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):  # row 1: padding on the left
        theirs[name][1] = np.roll(theirs[name][1], pad)
    np.savez(tmp_path / "in.npz", **theirs)
    forward.main([str(path), "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz")])
    got = np.load(tmp_path / "out.npz")["logits"]
    ids = np.where(theirs["attention_mask"] > 0, theirs["input_ids"], -1)
    assert max_diff(got, hf_logits(hf, theirs), ids) <= TOL
    np.savez(tmp_path / "bad.npz", **dict(theirs, image_token_pooling=theirs["image_token_pooling"][:-1]))
    with pytest.raises(SystemExit, match="image_token_pooling has 19 non-empty rows but input_ids holds 20"):
        forward.main([str(path), "--inputs", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o.npz")])
