"""Training-time dropout: response-only residual dropout and image-feature dropout (docs/architecture.md#dropout)."""
import jax
import numpy as np

from input_pipeline.random_data import bench_batch
from molmo_jax import config as config_lib
from molmo_jax import models as model_lib


def test_response_dropout_touches_only_response_positions_and_after():
    cfg = config_lib.tiny()
    cfg.llm.update(residual_dropout=0.0, response_residual_dropout=0.5)
    model = model_lib.create_model(cfg, seed=1)
    b = bench_batch(cfg, batch=2, seq_len=160, text_len=40, seed=0)
    args = (b["input_ids"], b["images"], b["image_masks"], b["image_input_idx"])
    response = b["loss_masks"] > 0
    first = int(np.argmax(response[0]))
    eval_logits = np.asarray(model(*args)["logits"])
    train_logits = np.asarray(model(*args, response_mask=response, dropout_rng=jax.random.key(0))["logits"])
    # Causal attention: positions before the first response token never see a dropped activation.
    np.testing.assert_allclose(train_logits[:, :first], eval_logits[:, :first], atol=1e-6)
    assert np.abs(train_logits[:, first:] - eval_logits[:, first:]).max() > 1e-3
    again = np.asarray(model(*args, response_mask=response, dropout_rng=jax.random.key(0))["logits"])
    np.testing.assert_array_equal(train_logits, again)  # seeded


def test_image_feature_dropout_changes_image_features_only():
    cfg = config_lib.tiny()
    cfg.init = "fan_in"  # features of O(1) at init (with 0.02 everywhere they are ~1e-7)
    cfg.connector.image_feature_dropout = 0.5
    model = model_lib.create_model(cfg, seed=1)
    b = bench_batch(cfg, batch=1, seq_len=160, text_len=40, seed=0)
    eval_feats = np.asarray(model.image_features(b["images"], b["image_masks"]))
    train_feats = np.asarray(model.image_features(b["images"], b["image_masks"], jax.random.key(1)))
    assert np.abs(train_feats - eval_feats).max() > 1e-3
    ids = b["input_ids"].copy()
    text_only = np.asarray(model(ids)["logits"])
    np.testing.assert_allclose(np.asarray(model(ids, dropout_rng=jax.random.key(1))["logits"]), text_only,
                               atol=1e-6)  # no images and no residual dropout configured: unchanged
