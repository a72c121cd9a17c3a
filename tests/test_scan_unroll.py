"""`scan_unroll` (molmo_jax/layers/scan.py scan_layers): unrolling the layer loop changes speed, not results."""
import numpy as np
import pytest

from molmo_jax import config as config_lib
from molmo_jax import models as model_lib


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.tiny()
    return cfg, model_lib.create_model(cfg, seed=0)


def _outputs(model, seed=1):
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    h, w = config_lib.patches_per_side(cfg)
    images = rng.uniform(-1, 1, (2, 2, h * w, 588)).astype(np.float32)
    masks = np.ones(images.shape[:3], np.float32)
    ids = rng.integers(0, 300, (2, 12)).astype(np.int32)
    return (np.asarray(model.image_features(images, masks)), np.asarray(model(ids)["logits"]))


def test_unrolled_layers_give_the_loops_outputs(tiny):
    cfg, model = tiny
    looped = _outputs(model)
    # The ViT runs its layers in segments ending at each selected layer (3 layers, features of -1 and
    # -3): an unroll of 2 does not divide every segment, so the remainder path is covered too.
    for unroll in (2, 8):
        cfg.scan_unroll = unroll
        try:
            unrolled = _outputs(model)
        finally:
            cfg.scan_unroll = 1
        for a, b in zip(looped, unrolled):
            # The same ops in the same order; XLA may fuse them differently: f32 noise only.
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_bad_unroll_is_named(tiny):
    cfg, model = tiny
    cfg.scan_unroll = 0
    try:
        with pytest.raises(ValueError, match="scan_unroll=0"):
            _outputs(model)
    finally:
        cfg.scan_unroll = 1
