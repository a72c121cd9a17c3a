"""Molmo2 presets and RoPE scaling: the presets against transformers' Molmo2 defaults and an
independent parameter count, every parameter's logical axes in the sharding rules, and the scaled
RoPE frequencies against transformers' own functions."""
import math

import numpy as np
import pytest
import transformers
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from molmo_jax import config as config_lib
from molmo_jax import models as model_lib
from molmo_jax import sharding
from molmo_jax.layers.rope import scaled_frequencies

MOLMO2 = config_lib.MOLMO2_PRESETS


def count_from_shapes(cfg) -> int:
    """Independent arithmetic over transformers' Molmo2 state dict shapes, not via the model."""
    l, v, c = cfg.llm, cfg.vit, cfg.connector
    d, hd, f = l.d_model, l.head_dim, l.mlp_dim
    q_norm = 2 * hd if l.qk_norm_type == "qwen3" else (l.n_heads + l.n_kv_heads) * hd
    block = d * (l.n_heads + 2 * l.n_kv_heads) * hd + l.n_heads * hd * d + 2 * d + q_norm + 3 * d * f
    llm = l.n_layers * block + (l.vocab_size + l.additional_vocab_size) * d + d + l.vocab_size * d
    w, m, vkv = v.width, v.mlp_dim, v.n_kv_heads * v.head_dim
    vit_block = 2 * (w * w + w) + 2 * (w * vkv + vkv) + 4 * w + 2 * w * m + m + w
    grid = (v.image_size[0] // v.patch_size) * (v.image_size[1] // v.patch_size)
    vit = v.n_layers * vit_block + (588 + 1) * w + grid * w
    k, a, akv = len(v.vit_layers) * w, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    adapter = (k * a + a) + 2 * (k * akv + akv) + (a * c.width + c.width) + 2 * c.width * c.projector_dim
    return llm + vit + adapter + c.projector_dim * d


@pytest.mark.parametrize("name", MOLMO2)
def test_presets_build_and_count_their_parameters(name):
    cfg = config_lib.get_config(name)
    assert cfg.family == "molmo2"
    n = model_lib.count_params(model_lib.abstract_model(cfg))
    assert n == count_from_shapes(cfg)


def test_8b_preset_is_transformers_default_molmo2():
    """transformers' Molmo2Config defaults are Molmo2-8B's tower and decoder sizes (not its RoPE
    theta, nor the adapter's inner width, which follow the decoder: Qwen3-8B's)."""
    cfg, hf = config_lib.get_config("molmo2_8b"), transformers.Molmo2Config()
    t, v, a = hf.text_config, hf.vision_config, hf.adapter_config
    l = cfg.llm
    assert (l.d_model, l.n_layers, l.n_heads, l.n_kv_heads, l.head_dim, l.mlp_dim, l.vocab_size,
            l.additional_vocab_size, l.qkv_bias, l.qk_norm_type, l.norm_after, l.norm_eps, l.max_sequence_length) == (
        t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
        t.intermediate_size, t.vocab_size, t.additional_vocab_size, t.attention_bias, t.qk_norm_type, t.norm_after,
        t.rms_norm_eps, t.max_position_embeddings)
    vit = cfg.vit
    assert (vit.width, vit.mlp_dim, vit.n_layers, vit.n_heads, vit.n_kv_heads, vit.head_dim, vit.norm_eps,
            list(vit.image_size), vit.patch_size, list(vit.vit_layers)) == (
        v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.num_key_value_heads,
        v.head_dim, v.layer_norm_eps, v.image_size, v.patch_size, a.vision_feature_layer)
    c = cfg.connector
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.width) == (a.num_attention_heads, a.num_key_value_heads,
                                                              a.head_dim, a.hidden_size)
    assert c.projector_dim == l.mlp_dim
    assert cfg.tokens.image_patch == hf.image_patch_id and cfg.tokens.image_start == hf.image_start_token_id
    assert cfg.tokens.frame_end == hf.frame_end_token_id


@pytest.mark.parametrize("name", ["molmo2_o_7b", "molmo2_tiny"])
def test_every_parameter_has_logical_axes_the_rules_know(name):
    model = model_lib.abstract_model(config_lib.get_config(name))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), (path, axes, var.shape)
        assert all(a in sharding.RULES for a in axes if a is not None), (path, axes)


ROPE_CASES = {
    "linear": dict(factor=4.0),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    "yarn": dict(factor=8.0, attention_factor=1.2079441541679836, beta_fast=32.0, beta_slow=1.0,
                 original_max_position_embeddings=8192),
    "yarn (attention factor from the scale)": dict(factor=4.0, original_max_position_embeddings=16,
                                                   beta_fast=8.0, beta_slow=1.0),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_scaled_rope_frequencies_match_transformers(case):
    params = dict(rope_type=case.split()[0], **ROPE_CASES[case])
    hf = transformers.Molmo2TextConfig(hidden_size=512, num_attention_heads=4, head_dim=128, num_hidden_layers=2,
                                       max_position_embeddings=65536, rope_parameters=dict(rope_theta=5e5, **params))
    want, want_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf)
    got, factor = scaled_frequencies(128, 5e5, params, 65536)
    # float32 on both sides; numpy's and torch's pow differ by an ulp or two (measured 2.3e-7 relative)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    assert math.isclose(factor, want_factor, rel_tol=1e-12)
    assert not np.allclose(got, scaled_frequencies(128, 5e5, dict(rope_type="default"), 65536)[0])


def test_unsupported_decoder_switches_are_refused():
    cfg = config_lib.get_config("molmo2_tiny")
    cfg.llm.rope_scaling = dict(rope_type="dynamic", factor=2.0)
    with pytest.raises(ValueError, match="llm.rope_scaling.rope_type='dynamic' is not supported"):
        model_lib.abstract_model(cfg)
    cfg = config_lib.get_config("molmo2_tiny")
    cfg.llm.qk_norm_type = "gemma"
    with pytest.raises(ValueError, match="llm.qk_norm_type='gemma'; choose one of olmo, qwen3"):
        model_lib.abstract_model(cfg)
