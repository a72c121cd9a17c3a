"""Parameter initialisation modes (molmo_jax/layers/core.py): "normal" is the original's N(0, 0.02)
everywhere; "fan_in" (training from scratch, the demo) keeps activations O(1): N(0, 1/fan_in) kernels,
N(0, 1) embedding tables, and residual-branch output projections of the ViT and the LLM scaled by
1/(2 n_layers) so that their blocks start near the identity."""
import numpy as np
import pytest

from molmo_jax import config as config_lib
from molmo_jax import models as model_lib


def _std(x):
    return float(np.std(np.asarray(x[...])))


@pytest.fixture(scope="module")
def models():
    out = {}
    for mode in ("normal", "fan_in"):
        cfg = config_lib.demo()
        cfg.init = mode
        out[mode] = (cfg, model_lib.create_model(cfg, seed=0))
    return out


def test_normal_mode_is_the_originals_0_02_everywhere(models):
    _, m = models["normal"]
    for name, x in [("token embedding", m.llm.embedding), ("ViT positions", m.vision.positional_embedding),
                    ("ViT attention out", m.vision.blocks.wo.kernel), ("ViT mlp out", m.vision.blocks.w2.kernel),
                    ("LLM q", m.llm.blocks.attn.wq.kernel), ("LLM attention out", m.llm.blocks.attn.wo.kernel),
                    ("LLM mlp out", m.llm.blocks.ffn.w_down.kernel)]:
        assert _std(x) == pytest.approx(0.02, rel=0.05), name


def test_fan_in_mode_scales(models):
    cfg, m = models["fan_in"]
    v = cfg.vit
    assert _std(m.llm.embedding) == pytest.approx(1.0, rel=0.05)
    assert _std(m.vision.positional_embedding) == pytest.approx(1.0, rel=0.1)
    assert _std(m.vision.blocks.wq.kernel) == pytest.approx(v.width ** -0.5, rel=0.05)
    near_identity = 1 / (2 * v.n_layers)
    assert _std(m.vision.blocks.wo.kernel) == pytest.approx((v.n_heads * v.head_dim) ** -0.5 * near_identity, rel=0.05)
    assert _std(m.vision.blocks.w2.kernel) == pytest.approx(v.mlp_dim ** -0.5 * near_identity, rel=0.05)
    llm = cfg.llm
    assert _std(m.llm.blocks.attn.wq.kernel) == pytest.approx(llm.d_model ** -0.5, rel=0.05)
    near_identity = 1 / (2 * llm.n_layers)
    assert _std(m.llm.blocks.attn.wo.kernel) == pytest.approx((llm.n_heads * llm.head_dim) ** -0.5 * near_identity,
                                                              rel=0.05)
    assert _std(m.llm.blocks.ffn.w_down.kernel) == pytest.approx(llm.mlp_dim ** -0.5 * near_identity, rel=0.05)


def test_fan_in_image_features_are_on_the_scale_of_token_embeddings(models):
    """The failure this init fixed: image features 100x the token embeddings they are added to."""
    cfg, m = models["fan_in"]
    rng = np.random.default_rng(0)
    n_patches = config_lib.patches_per_side(cfg)
    images = rng.uniform(-1, 1, (2, 2, n_patches[0] * n_patches[1], 588)).astype(np.float32)
    masks = np.ones(images.shape[:3], np.float32)
    feats = np.asarray(m.image_features(images, masks))
    ratio = float(np.sqrt(np.mean(feats ** 2))) / _std(m.llm.embedding)
    assert 0.1 < ratio < 10, ratio
