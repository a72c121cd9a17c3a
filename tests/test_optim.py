"""The optimiser recipe: schedules, groups, per-group clipping, frozen embedding, accumulation."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_pretrain
from input_pipeline.random_data import RandomBatches
from molmo_jax import optim, sharding
from molmo_jax import trainer as trainer_lib


def test_schedule_matches_the_original_formula():
    lr = optim.schedule(2e-4, warmup=200, total=1000, min_ratio=0.1)
    for count in (0, 99, 198, 199, 500, 998, 999, 1500):
        s = count + 1  # the original counts optimizer steps from 1
        if s < 200:
            want = 2e-4 * s / 200
        elif s < 1000:
            want = 2e-5 + (2e-4 - 2e-5) * (1 + math.cos(math.pi * (s - 200) / 800)) / 2
        else:
            want = 2e-5
        assert float(lr(count)) == pytest.approx(want, rel=1e-5), count


def test_groups_and_frozen_embedding():
    params = {"llm": {"embedding": 0, "new_embedding": 0, "blocks": {"w": 0}, "ln_f": {"weight": 0}},
              "vision": {"blocks": {"w": 0}}, "connector": {"w1": {"kernel": 0}}}
    labels = optim.group_labels(params, optim.optimizer_config())
    assert labels == {"llm": {"embedding": "frozen", "new_embedding": "connector", "blocks": {"w": "llm"},
                              "ln_f": {"weight": "llm"}},
                      "vision": {"blocks": {"w": "vit"}}, "connector": {"w1": {"kernel": "connector"}}}
    with pytest.raises(ValueError, match="extra/x matches no optimizer group"):
        optim.group_labels({"extra": {"x": 0}}, optim.optimizer_config())


def test_clipping_uses_each_groups_own_norm():
    clip = optim.clip_by_group_norm(1.0)
    big = {"a": jnp.array([30.0, 40.0])}     # norm 50 -> scaled to ~1
    small = {"a": jnp.array([0.3, 0.4])}     # norm 0.5 -> untouched
    out_big, _ = clip.update(big, clip.init(big))
    out_small, _ = clip.update(small, clip.init(small))
    np.testing.assert_allclose(out_big["a"], np.array([30.0, 40.0]) / (50 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(out_small["a"], small["a"])


def make_trainer(tmp_path, accum, batch=4):
    c = tiny_pretrain.get_config()
    c.update(dict(batch_size=batch, seq_len=128, total_steps=2, grad_accum_steps=accum, checkpoint_every=100,
                  async_checkpointing=False))
    c.model.llm.update(residual_dropout=0.0, response_residual_dropout=0.0)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1), devices=jax.devices()[:1])
    return c, trainer_lib.Trainer(c, str(tmp_path), mesh=mesh)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Micro-batches share the full batch's normaliser: 2 x 2 examples == 1 x 4 (float32 noise)."""
    results = []
    for accum in (1, 2):
        c, t = make_trainer(tmp_path / f"a{accum}", accum)
        embedding_before = np.asarray(t.params["llm"]["embedding"])
        t.fit(RandomBatches(c.model, batch_size=4, seq_len=128, seed=3, text_len=50), progress=False)
        results.append(jax.tree.map(np.asarray, t.params))
        # The base token embedding is frozen.
        np.testing.assert_array_equal(np.asarray(t.params["llm"]["embedding"]), embedding_before)
        assert not np.array_equal(np.asarray(t.params["llm"]["new_embedding"]),
                                  np.asarray(trainer_lib.init_params(c.model, t.mesh, c.seed, t.param_shardings)
                                             ["llm"]["new_embedding"]))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_bfloat16_gradient_accumulator(tmp_path):
    """grad_accum_dtype=bfloat16 accumulates micro-batch gradients in bfloat16 (half the accumulator's
    memory and traffic): the step's gradient norms are those of float32 accumulation within bfloat16
    rounding (2^-8 relative per value), and not bit-equal to them; an unknown dtype is refused."""
    norms = {}
    for dtype in ("float32", "bfloat16"):
        c, t = make_trainer(tmp_path / dtype, 2)
        c.grad_accum_dtype = dtype
        t = trainer_lib.Trainer(c, str(tmp_path / dtype), mesh=t.mesh)
        t.fit(RandomBatches(c.model, batch_size=4, seq_len=128, seed=3, text_len=50), progress=False)
        rows = [json.loads(line) for line in open(tmp_path / dtype / "metrics.jsonl")]
        norms[dtype] = np.array([rows[0][k] for k in sorted(rows[0]) if k.startswith("grad_norm/")])
    np.testing.assert_allclose(norms["bfloat16"], norms["float32"], rtol=1e-2)
    assert not np.array_equal(norms["bfloat16"], norms["float32"])
    c, t = make_trainer(tmp_path / "bad", 2)
    c.grad_accum_dtype = "float16"
    with pytest.raises(ValueError, match="grad_accum_dtype='float16'; choose 'float32' or 'bfloat16'"):
        trainer_lib.Trainer(c, str(tmp_path / "bad"), mesh=t.mesh).fit(
            RandomBatches(c.model, batch_size=4, seq_len=128, seed=3, text_len=50), progress=False)
