"""Presets: released parameter counts (computed abstractly), logical axes, scan keeps programs small."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from molmo_jax import config as config_lib
from molmo_jax import models as model_lib


def count_from_shapes(cfg) -> int:
    """Independent arithmetic over the released key/shape table (docs/architecture.md#presets), not via the model."""
    l, v = cfg.llm, cfg.vit
    d, hd, f = l.d_model, l.head_dim, l.mlp_dim
    qkv = d * (l.n_heads + 2 * l.n_kv_heads) * hd + (l.n_heads + 2 * l.n_kv_heads) * hd * l.qkv_bias
    block = qkv + l.n_heads * hd * d + 2 * d + (d + l.n_kv_heads * hd) * l.qk_norm
    if l.moe_num_experts:
        block += l.moe_num_experts * d + 3 * l.moe_num_experts * f * d
    else:
        block += 3 * d * f
    llm = l.n_layers * block + 2 * l.embedding_size * d + l.additional_vocab_size * d + d
    w, m = v.width, v.mlp_dim
    grid = (v.image_size[0] // v.patch_size) * (v.image_size[1] // v.patch_size)
    vit_block = 4 * (w * w + w) + 4 * w + 2 * w * m + m + w
    vit = v.n_layers * vit_block + w * 588 + w + (1 + grid) * w + 2 * w
    k = len(v.vit_layers) * w
    connector = 3 * (k * w + w) + w * w + w + 2 * k + 2 * w * f + f * d
    return llm + vit + connector


@pytest.mark.parametrize("name,released", [
    ("molmo_7b_d", 8_021_025_280),  # the released Molmo-7B-D index metadata
    ("molmoe_1b", None), ("molmo_7b_o", None), ("molmo_72b", None)])
def test_preset_parameter_counts(name, released):
    cfg = config_lib.get_config(name)
    n = model_lib.count_params(model_lib.abstract_model(cfg))
    assert n == count_from_shapes(cfg)
    if released:
        assert n == released
    # The released models' parameter totals, in billions, to the digits published.
    assert round(n / 1e9, 2) == {"molmo_7b_d": 8.02, "molmoe_1b": 7.22, "molmo_7b_o": 7.67, "molmo_72b": 73.31}[name]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'molmo_8b'"):
        config_lib.get_config("molmo_8b")


def test_every_parameter_has_logical_axes():
    model = model_lib.abstract_model(config_lib.get_config("molmoe_1b"))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
    stacked = nnx.state(model.llm.blocks, nnx.Param)
    for path, var in nnx.to_flat_state(stacked):
        assert var.get_metadata()["out_sharding"][0] == "layers", path


def lowered_size(name, seq=32):
    cfg = config_lib.get_config(name)
    graphdef, state = nnx.split(model_lib.abstract_model(cfg))
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids)["logits"]

    text = jax.jit(fwd).lower(state, ids).as_text()
    return len(text.splitlines())


def test_scanned_layers_keep_the_program_size_independent_of_depth():
    """80 layers (72B) lower to the same program as 28 (7B-D): lax.scan, not unrolled blocks.
    (Timings are in docs/benchmarks.md; here the deterministic proxy: program size.)"""
    small, big = lowered_size("molmo_7b_d"), lowered_size("molmo_72b")
    assert abs(big - small) <= 0.02 * small, (small, big)


def test_moe_ragged_equals_dense():
    cfg = config_lib.tiny()
    cfg.llm.update(moe_num_experts=8, moe_top_k=2, qkv_bias=False, qk_norm=True)
    model = model_lib.create_model(cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, 500, size=(2, 12))
    ids[1, 9:] = -1
    ragged = model(ids)["logits"]
    cfg.llm.moe_impl = "dense"
    dense = model_lib.create_model(cfg, 3)(ids)["logits"]
    np.testing.assert_allclose(np.asarray(ragged), np.asarray(dense), atol=1e-5)


RELEASED_HF_CONFIGS = {
    # The released config.json files (Hugging Face), LLM fields only; vision is fixed in the release.
    "molmo_7b_d": dict(attention_layer_norm=False, clip_qkv=None, embedding_size=152064, hidden_size=3584,
                       intermediate_size=37888, layer_norm_eps=1e-06, layer_norm_type="rms",
                       max_position_embeddings=4096, norm_after=False, num_attention_heads=28,
                       num_hidden_layers=28, num_key_value_heads=4, qkv_bias=True, rope_theta=1000000.0,
                       vocab_size=152064, weight_tying=False),
    "molmo_72b": dict(attention_layer_norm=False, clip_qkv=None, embedding_size=152064, hidden_size=8192,
                      intermediate_size=59136, layer_norm_eps=1e-05, layer_norm_type="rms",
                      max_position_embeddings=4096, norm_after=False, num_attention_heads=64,
                      num_hidden_layers=80, num_key_value_heads=8, qkv_bias=True, rope_theta=1000000.0,
                      vocab_size=152064, weight_tying=False),
    "molmo_7b_o": dict(attention_layer_norm=True, clip_qkv=None, embedding_size=100352, hidden_size=4096,
                       intermediate_size=22016, layer_norm_eps=1e-06, layer_norm_type="rms",
                       max_position_embeddings=4096, norm_after=True, num_attention_heads=32,
                       num_hidden_layers=32, num_key_value_heads=None, qkv_bias=False, rope_theta=500000.0,
                       vocab_size=100278, weight_tying=False),
}


@pytest.mark.parametrize("name", sorted(RELEASED_HF_CONFIGS))
def test_released_hf_config_matches_preset(name):
    from molmo_jax.weights.mappings.molmo import config_from_released
    got = config_from_released(RELEASED_HF_CONFIGS[name], name)
    want = config_lib.get_config(name)
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "vocab_size",
                "embedding_size", "qkv_bias", "qk_norm", "norm_after", "norm_eps", "rope_theta"):
        assert got.llm[key] == want.llm[key], key
    assert got.vit.to_dict() == want.vit.to_dict()
    assert got.connector.to_dict() == want.connector.to_dict()
