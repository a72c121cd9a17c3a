"""Molmo2 presets (`family="molmo2"`) and the sizes its model derives.

A Molmo2 config has the parts of every model config (`molmo_jax.config.model_config`): `vit` (a
SigLIP2 so400m/14 tower at 378 px: no class token, no pre-norm, biased patch embedding), `connector`
(the adapter: one attention with kv heads pooling the patches an index table names, then a SwiGLU
projector), `llm` (Qwen3 or OLMo3), `image` (the preprocessing defaults of transformers'
Molmo2 processors) and `tokens` (the image special tokens; the model reads `image_patch`).

Decoder switches beyond Molmo's: `llm.qk_norm_type` ("qwen3": one RMSNorm per head; "olmo": over
the whole projection), `llm.rope_scaling` (transformers' `rope_parameters` without `rope_theta`;
`{"rope_type": "default"}` = unscaled) applied on `llm.rope_scaling_layers` (None = every layer).

Numbers of the released models: the towers are those of transformers' Molmo2 configuration defaults
(Molmo2-8B); the decoders are Qwen3-8B (Molmo2-8B), Qwen3-4B-Instruct-2507 (Molmo2-4B) and
OLMo3-7B-Instruct (Molmo2-O-7B, its YaRN RoPE on the full-attention layers 3, 7, ..., 31), as the
original training code lists them; the adapter's inner width is the decoder's.
"""
from __future__ import annotations

import ml_collections

from molmo_jax import config as config_lib

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# Offsets of the image special tokens after the base vocabulary (`vocab_size + offset`).
TOKEN_OFFSETS = dict(image_start=0, image_end=1, image_patch=2, low_res_image_start=4, frame_start=7,
                     frame_end=8)


def vit_config(**overrides) -> ml_collections.ConfigDict:
    """SigLIP2 so400m/14-378 with the 25 of its 27 layers the features use (24 and 18)."""
    c = config_lib.vit_config(image_size=(378, 378), patch_size=14, width=1152, n_layers=25, n_heads=16,
                              head_dim=72, mlp_dim=4304, norm_eps=1e-6, activation="gelu", vit_layers=(24, 18))
    c.update(dict(n_kv_heads=16, class_token=False, pre_ln=False, patch_bias=True))
    c.update(overrides)
    return c


def adapter_config(**overrides) -> ml_collections.ConfigDict:
    """The pooling attention (its heads and output `width`) and the projector's inner width
    (`projector_dim`; 0 becomes the decoder's `mlp_dim`, the released models' choice). `pool_h` x
    `pool_w` is the image pooling window and `video_pool_h` x `video_pool_w` the video one (the index
    tables carry them; the model does not read them)."""
    c = ml_collections.ConfigDict(dict(
        n_heads=16, n_kv_heads=16, head_dim=72, width=1152, projector_dim=0,
        pool_h=2, pool_w=2, video_pool_h=3, video_pool_w=3, image_feature_dropout=0.0,
    ))
    c.update(overrides)
    return c


def image_config(**overrides) -> ml_collections.ConfigDict:
    """Molmo2ImageProcessor / Molmo2VideoProcessor defaults: 378-px crops, at most 8 plus the
    resized view, overlap margins of 4 patches, SigLIP normalisation; video frames at most 64, 2 fps."""
    c = ml_collections.ConfigDict(dict(
        crop_mode="molmo2", max_crops=8, overlap_margins=(4, 4), mean=SIGLIP_MEAN, std=SIGLIP_STD,
        use_col_tokens=True, video_max_frames=64, video_max_fps=2.0, video_use_col_tokens=False,
    ))
    c.update(overrides)
    return c


def token_ids(vocab_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: vocab_size + v for k, v in TOKEN_OFFSETS.items()})


def llm_config(**overrides) -> ml_collections.ConfigDict:
    c = config_lib.llm_config(additional_vocab_size=128, qkv_bias=False, qk_norm=True, norm_eps=1e-6)
    c.update(dict(qk_norm_type="qwen3", rope_scaling=dict(rope_type="default"), rope_scaling_layers=None))
    c.update(overrides)
    return c


def model_config(name: str, llm, vit=None, connector=None, image=None, **top) -> ml_collections.ConfigDict:
    c = config_lib.model_config(name, llm, vit=vit or vit_config(), connector=connector or adapter_config(),
                                image=image or image_config(), **top)
    c.family = "molmo2"
    c.connector.projector_dim = c.connector.projector_dim or llm.mlp_dim  # explicit, as transformers' configs
    if "tokens" not in c:
        c.tokens = token_ids(llm.vocab_size)
    return c


def molmo2_8b():
    return model_config("molmo2_8b", llm_config(
        d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=12288,
        vocab_size=151936, embedding_size=151936, rope_theta=1_000_000.0, max_sequence_length=36864,
        bos_token_id=151645, eos_token_id=151645))


def molmo2_4b():
    return model_config("molmo2_4b", llm_config(
        d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, mlp_dim=9728,
        vocab_size=151936, embedding_size=151936, rope_theta=5_000_000.0, max_sequence_length=36864,
        bos_token_id=151645, eos_token_id=151645))


def molmo2_o_7b():
    return model_config("molmo2_o_7b", llm_config(
        d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, mlp_dim=11008,
        vocab_size=100278, embedding_size=100278, qk_norm_type="olmo", norm_after=True, rope_theta=500_000.0,
        rope_scaling=dict(rope_type="yarn", factor=8.0, attention_factor=1.2079441541679836, beta_fast=32.0,
                          beta_slow=1.0, original_max_position_embeddings=8192),
        rope_scaling_layers=tuple(range(3, 32, 4)), max_sequence_length=65536,
        bos_token_id=100257, eos_token_id=100257))


def molmo2_tiny():
    """A small Molmo2 with the real structure, for tests and smoke runs: 56-px crops of 4x4 patches; its
    vocabulary is that of molmo_jax/assets/molmo2_tiny_tokenizer (Molmo2 tokens at 387 + offset)."""
    return model_config(
        "molmo2_tiny",
        llm_config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96, vocab_size=387,
                   embedding_size=387, additional_vocab_size=16, max_sequence_length=1024,
                   bos_token_id=386, eos_token_id=386),
        vit=vit_config(image_size=(56, 56), width=32, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=8, mlp_dim=64,
                       vit_layers=(-1, -3)),
        connector=adapter_config(n_heads=4, n_kv_heads=2, head_dim=8, width=32, projector_dim=48),
        image=image_config(max_crops=4, overlap_margins=(1, 1), video_max_frames=8),
    )


# ----------------------------------------------------------------------------------------------
# Derived quantities

def patches_per_crop(cfg) -> int:
    ph, pw = config_lib.patches_per_side(cfg)
    return ph * pw


def image_patch_id(cfg) -> int:
    return cfg.tokens.image_patch
